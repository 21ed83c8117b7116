#!/usr/bin/env bash
# Regenerates the figures of docs/plots.md from short real runs (about two minutes on one CPU core).
#   bash docs/figures/make.sh            (run from the repository root, with lscape installed)
set -euo pipefail
out=$(mktemp -d)
fig=docs/figures
common=(--no-progress)

# 1. edge of stability: full-batch GD at two step sizes, λ_max against 2/η and the SAM-edge
for lr in 0.1 0.4; do
  lscape run "${common[@]}" --name "gd lr=$lr" --out "$out/eos-$lr.zarr" --data synthetic \
    --data-opt task=regression --data-opt n=256 --loss mse --model-opt activation=tanh \
    --batch-size full --lr "$lr" --steps 300 --plugin eos -o eos.every=10 -o eos.rho=0.05
done
lscape plot "$out/eos-0.1.zarr" "$out/eos-0.4.zarr" --out "$out/p-eos"

# 2. small vs large batch on digits, loss-matched: sharpness, gradient noise, the loss
for b in 32 512; do
  lscape run "${common[@]}" --name "batch $b" --out "$out/batch-$b.zarr" --batch-size "$b" --lr 0.1 \
    --epochs 60 --until-loss 0.15 --until-loss-every 5 --plugin sharpness -o sharpness.every=20 \
    --plugin grad-noise -o grad-noise.every=20
done
lscape plot "$out/batch-32.zarr" "$out/batch-512.zarr" --out "$out/p-batch"
lscape compare "$out/batch-32.zarr" "$out/batch-512.zarr" > "$fig/compare_batch.txt"

# 3. Hessian outliers: top-20 eigenvalues by Lanczos, SLQ density against the exact spectrum
lscape run "${common[@]}" --name "mlp 10 classes" --out "$out/hess.zarr" --data synthetic --data-opt n=512 \
  --data-opt dim=16 --data-opt classes=10 --model-opt widths=24 --batch-size 64 --epochs 12 \
  --plugin hessian -o hessian.k=20 -o hessian.every=40 --plugin hessian-exact -o hessian-exact.every=40
lscape plot "$out/hess.zarr" --out "$out/p-hess"

cp "$out/p-eos/eos_eigenvalues.png" "$fig/eos_eigenvalues.png"
cp "$out/p-eos/train_loss.png" "$fig/eos_train_loss.png"
cp "$out/p-batch/train_loss.png" "$fig/batch_train_loss.png"
cp "$out/p-batch/sharpness_lambda_max.png" "$fig/batch_sharpness.png"
cp "$out/p-batch/grad_noise.png" "$fig/batch_grad_noise.png"
cp "$out/p-hess/hessian_top_eigenvalues.png" "$fig/hessian_top_eigenvalues.png"
cp "$out/p-hess/hessian_exact_histogram.png" "$fig/hessian_exact_histogram.png"
rm -rf "$out"
echo "figures in $fig"
