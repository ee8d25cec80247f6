#!/usr/bin/env bash
# GPU paths, run on a lent GPU machine (python3 there holds torch with CUDA):
#   the LM in fp32 and fp16, a datastore dumped on the GPU, kNN-LM evaluation with queries on
#   the GPU, --knn-gpu (falls back to CPU FAISS when faiss has no GPU build), --knn-search exact
#   (keys resident on the GPU, fp16 and fp32) against CPU FAISS, the scoring math on CUDA
#   tensors against the CPU, and exact search on a synthetic 10M x 1024 fp16 datastore
#   generated on the GPU (benchmarks/exact_gpu.py: torch only). Under 8 minutes on one H200.
# Inputs (carried): .whl/ (fairseq and friends for Python 3.12), gpu_carry/{bin,model.pt}
# (a binarized corpus and a model-only checkpoint). Output: $OUT/gpu_check.log.
# Dry run on a CPU at a tiny size (the tests' tiny LM; python3 = a venv with everything):
#   NO_INSTALL=1 D=BIN C=CKPT TPS=64 CW=32 NC=8 CS=8 KK=8 XROWS=20000 XDIM=64 XQ=256 XB=128 XK=32 bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
[[ -n ${NO_INSTALL:-} ]] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'EOF'
import torch, faiss, fairseq
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(),
      "| fairseq", fairseq.__version__, "| faiss", faiss.__version__,
      "GPUs seen by faiss:", faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0)
EOF
D=${D:-gpu_carry/bin} C=${C:-gpu_carry/model.pt} W=/tmp/w TPS=${TPS:-256} CW=${CW:-128}
NC=${NC:-1024} CS=${CS:-64} KK=${KK:-1024}
rm -rf $W; mkdir -p $W
E=(python3 -m fairseq_cli.eval_lm $D --path $C --user-dir fairseq_plugins --task knnlm
   --tokens-per-sample $TPS --context-window $CW --max-tokens 16384 --num-workers 0 --no-progress-bar)
K=(--knnlm --dstore-filename $W/train --indexfile $W/knn.index --k $KK --probe 32 --lmbda 0.25 --knn-temp 1)
step() {  # step TITLE command...: run, keep the lines that matter, time it
    echo "== $1"; shift
    local s=$(date +%s.%N)
    "$@" 2>&1 | grep -E "Evaluated|Loss \(base 2\)|kNN-LM:|datastore complete|on the CPU|rror|PASS|FAIL|checks|keys/s|train |add " | sed 's/^.*INFO[^:]*: *//'
    echo "   wall $(python3 -c "print(f'{$(date +%s.%N)-$s:.1f}')") s"
}
step "plain eval, valid, fp32" "${E[@]}" --gen-subset valid
step "plain eval, valid, fp16" "${E[@]}" --gen-subset valid --fp16
step "dump the train split on the GPU (fp16 model, fp16 keys)" "${E[@]}" --gen-subset train --fp16 --save-knnlm-dstore --dstore-mmap $W/train --dstore-fp16
step "index (CPU FAISS, $(nproc) cores)" python3 -m knnlm.index.builder dstore_mmap=$W/train faiss_index=$W/knn.index ncentroids=$NC code_size=$CS num_keys_to_train=200000
if python3 -c "import faiss, sys; sys.exit(0 if getattr(faiss, 'get_num_gpus', lambda: 0)() > 0 else 1)" 2>/dev/null; then
    step "kNN-LM eval, valid: fp16 model, --knn-gpu, recompute l2" "${E[@]}" --gen-subset valid --fp16 "${K[@]}" --knn-gpu
else  # the CPU fallback is what the next step measures anyway (saves ~70 s)
    echo "== --knn-gpu skipped: this faiss has no GPU support (it would warn and search on the CPU, as the next step does)"
fi
step "kNN-LM eval, valid: fp32 model, CPU search, recompute l2" "${E[@]}" --gen-subset valid "${K[@]}"
step "kNN-LM eval, valid: fp16 model, FAISS distances" "${E[@]}" --gen-subset valid --fp16 "${K[@]}" --knn-sim-func do_not_recomp_l2
X=(--knnlm --dstore-filename $W/train --k $KK --lmbda 0.25 --knn-temp 1 --knn-search exact)  # no index
step "kNN-LM eval, valid: fp16 model, --knn-search exact on the GPU (fp16 keys)" "${E[@]}" --gen-subset valid --fp16 "${X[@]}"
step "kNN-LM eval, valid: fp16 model, --knn-search exact on the GPU (fp32 keys)" "${E[@]}" --gen-subset valid --fp16 "${X[@]}" --knn-exact-dtype fp32
step "kNN-LM eval, valid: fp32 model, --knn-search exact on all GPUs (auto: fp16 keys)" "${E[@]}" --gen-subset valid "${X[@]}" --knn-exact-devices all
step "knnlm-check on the GPU-made datastore" python3 -m fairseq_plugins.check --path $C --dstore-filename $W/train --indexfile $W/knn.index --data $D
echo "== scoring math: CUDA vs CPU"
python3 - <<'EOF'
import torch
from knnlm.scoring import knn_log_prob, neighbor_scores, interpolate, knn_full_log_probs
g = torch.Generator().manual_seed(0)
d = torch.rand(4096, 1024, generator=g) * 3000
v = torch.randint(0, 5000, (4096, 1024), generator=g)
t = v[:, 7].clone()
lm = torch.log_softmax(torch.randn(4096, 5000, generator=g), -1)
cpu = interpolate(lm.gather(1, t[:, None])[:, 0], knn_log_prob(neighbor_scores(d, "l2", 10.0), v, t), 0.25)
c = lambda x: x.cuda()
gpu = interpolate(c(lm).gather(1, c(t)[:, None])[:, 0], knn_log_prob(neighbor_scores(c(d), "l2", 10.0), c(v), c(t)), 0.25)
print("max |cpu - cuda| of log p =", (cpu - gpu.cpu()).abs().max().item())
full = knn_full_log_probs(c(lm), neighbor_scores(c(d), "l2", 10.0), c(v), 0.25)
print("full distribution sums to 1 on CUDA: max error", (full.exp().sum(-1) - 1).abs().max().item())
EOF
echo "== exact search, synthetic 10M x 1024 fp16 keys generated on the GPU, k=1024 (torch only)"
timeout 300 python3 -m benchmarks.exact_gpu --rows ${XROWS:-10000000} --dim ${XDIM:-1024} --queries ${XQ:-8192} --batch ${XB:-2048} --k ${XK:-1024}
echo "== perplexities side by side (exact search vs FAISS IVFPQ on the CPU: approximate search, same datastore)"
grep -E "^== kNN-LM eval|kNN-LM: " "$OUT/gpu_check.log" | sed 's/^.*kNN-LM: /   kNN-LM: /'
echo "== done"
