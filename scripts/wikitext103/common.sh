# Sourced by every script in scripts/wikitext103/ (not run on its own).
#
# Defaults come from configs/wikitext103.yaml (the paper's values); any variable set in the
# environment wins, e.g. `K=8 WORK=/tmp/small scripts/wikitext103/table1.sh`. KNNLM_CONFIG
# points at another YAML file of the same form, PYTHON at the interpreter (default: python).
#
# Helpers:
#   run CMD...           log CMD (copy-pasteable) to stderr and $LOG_DIR/commands.log, run it
#   step META LOG DEPS -- CMD...
#                        run CMD (output to LOG) unless META is complete, was written by this
#                        very CMD and is newer than each DEP: datastores, indexes and exports
#                        are reused while up to date (FORCE=1 redoes them)
#   eval_args DATA SPLIT / knn_args PREFIX INDEX KEYTYPE
#                        fill the arrays EVAL and KNN with the paper's evaluation options
#   ppl_from LOG base|knn|lm
#                        a perplexity from a fairseq-eval-lm log: our summary line
#                        ("kNN-LM: N tokens, base LM perplexity X, kNN-LM perplexity Y") or
#                        fairseq's own "Perplexity: Z" line
#   dump_datastore PREFIX KEYTYPE [DATA], build_index PREFIX INDEX,
#   ensure_knn PREFIX INDEX KEYTYPE [DATA] (both), knn_export NAME DATA SPLIT PREFIX INDEX KEYTYPE
#   supported_keytypes KT...   the ones the checkpoint supports (python -m fairseq_plugins.keytypes,
#                        checked once per checkpoint); require_keytype KT dies unless supported
#   check_base_ppl       the base LM's valid perplexity must be BASE_PPL_TARGET +- BASE_PPL_TOLERANCE
#                        (run before any dump: a wrong checkpoint or dictionary stops here)

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PLUGIN=$REPO/fairseq_plugins
KNNLM_CONFIG=${KNNLM_CONFIG:-$REPO/configs/wikitext103.yaml}
PYTHON=${PYTHON:-python}

log() { echo "[$(date '+%F %T')] $*" >&2; }
die() { echo "error: $*" >&2; exit 1; }

need() {
    local tool
    for tool; do
        command -v "$tool" >/dev/null ||
            die "$tool not found on PATH: activate the project's environment (source .venv/bin/activate, after make install)"
    done
}

need "$PYTHON"
# YAML -> `export NAME=value` lines, in file order, so ${NAME} may refer to earlier entries;
# values already in the environment are kept as they are.
defaults=$("$PYTHON" - "$KNNLM_CONFIG" <<'EOF'
import os, shlex, sys, yaml
for name, value in yaml.safe_load(open(sys.argv[1])).items():
    if name not in os.environ:
        os.environ[name] = os.path.expandvars("" if value is None else str(value))
    print(f"export {name}={shlex.quote(os.environ[name])}")
EOF
) || die "cannot read the defaults in $KNNLM_CONFIG"
eval "$defaults"
unset defaults
# The checkpoint: CKPT, CKPT_URL and SRCDICT default to those of CKPT_SOURCE.
case $CKPT_SOURCE in
    original)  # the kNN-LM authors' checkpoint (their README); its dictionary is built from the training text
        CKPT=${CKPT:-$CKPT_DIR/wt103_checkpoint_best.pt}
        CKPT_URL=${CKPT_URL:-https://nlp.stanford.edu/projects/knnlm/wt103_checkpoint_best.pt}
        SRCDICT=${SRCDICT:-} ;;
    fairseq)   # fairseq's adaptive_lm_wiki103.v2 archive, with its dict.txt
        CKPT=${CKPT:-$CKPT_DIR/adaptive_lm_wiki103.v2/model.pt}
        CKPT_URL=${CKPT_URL:-https://dl.fbaipublicfiles.com/fairseq/models/lm/adaptive_lm_wiki103.v2.tar.bz2}
        SRCDICT=${SRCDICT:-$CKPT_DIR/adaptive_lm_wiki103.v2/dict.txt} ;;
    *) echo "error: CKPT_SOURCE must be original or fairseq, got '$CKPT_SOURCE'" >&2; exit 1 ;;
esac
export CKPT CKPT_URL SRCDICT
mkdir -p "$LOG_DIR" "$RESULTS"

run() {
    local line
    line=$(printf ' %q' "$@")
    log "+$line"
    echo "[$(date '+%F %T')]$line" >>"$LOG_DIR/commands.log"
    "$@"
}

newer_than_all() {  # FILE DEP...: FILE exists and is newer than every DEP
    local f=$1 dep
    shift
    for dep; do [[ $f -nt $dep ]] || return 1; done
}

step() {
    local meta=$1 out=$2 deps=() cmd
    shift 2
    while [[ $1 != -- ]]; do deps+=("$1"); shift; done
    shift
    cmd=$(printf '%q ' "$@")
    if [[ $FORCE != 1 && -f $meta.cmd && $(<"$meta.cmd") == "$cmd" ]] &&
        grep -qs '"complete": true' "$meta" && newer_than_all "$meta" "${deps[@]}"; then
        log "up to date, not redone: ${meta} (FORCE=1 redoes it)"
        return 0
    fi
    rm -f "$meta.cmd"
    # Everything to the log and to stderr, so stdout carries only results.
    run "$@" 2>&1 | tee "$out" >&2
    echo "$cmd" >"$meta.cmd"
}

resolve_device() {
    if [[ $DEVICE_ARGS == auto ]]; then
        if "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
            DEVICE_ARGS=--fp16
        else
            [[ $ALLOW_CPU == 1 ]] ||
                die "CPUDeviceRefused: DEVICE_ARGS=auto found no CUDA GPU. The WikiText-103 dump and evaluations on a CPU take weeks (and run the LM in fp32, not the paper's fp16); set ALLOW_CPU=1 to run on the CPU anyway"
            DEVICE_ARGS=--cpu
        fi
        log "DEVICE_ARGS=auto: using $DEVICE_ARGS"
    fi
    if [[ " $DEVICE_ARGS " == *" --cpu "* && $ALLOW_CPU != 1 ]]; then
        die "CPUDeviceRefused: DEVICE_ARGS=$DEVICE_ARGS runs the LM on the CPU: weeks for the WikiText-103 dump. Set ALLOW_CPU=1 if you mean it (a small stand-in)"
    fi
    if [[ " $DEVICE_ARGS " == *" --cpu "* ]]; then
        log "warning: running the LM on the CPU (ALLOW_CPU=1)"
    fi
}

require_inputs() {  # the checkpoint and the binarized data, made by the first two scripts
    [[ -f $CKPT ]] || die "no checkpoint at $CKPT: run scripts/wikitext103/fetch_checkpoint.sh (or set CKPT)"
    [[ -f $DATA_BIN/dict.txt && -f $DATA_BIN/train.idx ]] ||
        die "no binarized data in $DATA_BIN: run scripts/wikitext103/prepare_data.sh (or set DATA_BIN)"
}

fairseq_args() {  # DATA SPLIT TOKENS_PER_SAMPLE CONTEXT_WINDOW BREAK_MODE -> array FAIRSEQ
    local device extra
    resolve_device
    read -ra device <<<"$DEVICE_ARGS"
    read -ra extra <<<"$EVAL_EXTRA_ARGS"
    FAIRSEQ=(fairseq-eval-lm "$1" --path "$CKPT" --user-dir "$PLUGIN" --task knnlm --gen-subset "$2"
        --tokens-per-sample "$3" --context-window "$4" --sample-break-mode "$5"
        --max-tokens "$MAX_TOKENS" --softmax-batch "$SOFTMAX_BATCH" "${device[@]}" "${extra[@]}")
}

eval_args() {  # DATA SPLIT -> array EVAL: the paper's evaluation (512 scored, 2560 context)
    fairseq_args "$1" "$2" "$EVAL_TOKENS_PER_SAMPLE" "$EVAL_CONTEXT_WINDOW" "$EVAL_BREAK_MODE"
    EVAL=("${FAIRSEQ[@]}")
}

knn_args() {  # PREFIX INDEX KEYTYPE -> array KNN
    KNN=(--knnlm --dstore-filename "$1" --indexfile "$2" --knn-keytype "$3" --k "$K" --probe "$PROBE"
        --lmbda "$LMBDA" --knn-temp "$KNN_TEMP" --knn-sim-func "$SIM_FUNC")
    if [[ $KNN_GPU == 1 ]]; then KNN+=(--knn-gpu); fi
}

ppl_from() {  # LOG base|knn|lm
    local v=
    case $2 in
        base) v=$(sed -n 's/.*base LM perplexity \([0-9.]*\).*/\1/p' "$1" | tail -n 1) ;;
        knn) v=$(sed -n 's/.*kNN-LM perplexity \([0-9.]*\|inf\) .*/\1/p' "$1" | tail -n 1) ;;
        lm) v=$(sed -n 's/.*Perplexity: \([0-9.]*\|inf\).*/\1/p' "$1" | tail -n 1) ;;
    esac
    [[ -n $v ]] || die "no $2 perplexity in $1 (see that log)"
    echo "$v"
}

json_get() {  # FILE KEY: a field of a JSON file (a.b for a nested one)
    "$PYTHON" -c 'import functools, json, sys; print(functools.reduce(lambda d, k: d[k], sys.argv[2].split("."), json.load(open(sys.argv[1]))))' "$1" "$2"
}

keytype_cache() {  # sets KT_CACHE: the key types $CKPT supports, checked on the model once per checkpoint
    KT_CACHE=$LOG_DIR/keytypes_$(printf '%s' "$CKPT" | cksum | cut -d' ' -f1).txt
    if ! [[ -f $KT_CACHE && $KT_CACHE -nt $CKPT && $(head -n 1 "$KT_CACHE") == "$CKPT" ]]; then
        log "checking which key types $CKPT supports (python -m fairseq_plugins.keytypes)"
        { echo "$CKPT"; "$PYTHON" -m fairseq_plugins.keytypes "$CKPT" --data "$DATA_BIN" --and-output-state 2>"$KT_CACHE.log"; } >"$KT_CACHE.tmp" ||
            die "cannot check the key types of $CKPT: $(tail -n 3 "$KT_CACHE.log")"
        mv "$KT_CACHE.tmp" "$KT_CACHE"
    fi
}

supported_keytypes() {  # KT...: those the checkpoint supports, one per line; the others named on stderr
    local cache kt
    keytype_cache
    cache=$KT_CACHE
    for kt; do
        if tail -n +2 "$cache" | grep -qx "$kt"; then
            echo "$kt"
        else
            log "key type $kt left out: $CKPT does not support it ($(grep -m1 "key type $kt " "$cache.log" | sed 's/.*: //'))"
        fi
    done
}

require_keytype() {  # KT: die before any dump unless the checkpoint supports it
    [[ -n $(supported_keytypes "$1") ]] ||
        die "KeytypeUnsupported: $CKPT has no $1 state (see $LOG_DIR/keytypes_*.txt.log): set KEYTYPE to one of: $(supported_keytypes last_ffn_input last_ffn_input_before_ln last_attn_input last_attn_input_before_ln decoder_output decoder_output_ln 2>/dev/null | tr '\n' ' ')"
}

output_keytype() {  # the state the model's output layer reads (the continuous cache's hidden state)
    keytype_cache
    sed -n 's/^output_state=//p' "$KT_CACHE"
}

check_base_ppl() {  # the base LM's valid perplexity, at the evaluation settings, against BASE_PPL_TARGET
    local out=$LOG_DIR/base_ppl_valid.log done=$LOG_DIR/base_ppl_valid.done cmd ppl
    if [[ -z $BASE_PPL_TARGET ]]; then
        log "BASE_PPL_TARGET is empty: the base LM's valid perplexity is not checked"
        return 0
    fi
    eval_args "$DATA_BIN" valid
    cmd=$(printf '%q ' "${EVAL[@]}")
    if [[ $FORCE == 1 || ! -f $done || $(head -n 1 "$done") != "$cmd" ]] || ! newer_than_all "$done" "$CKPT" "$DATA_BIN/valid.bin"; then
        log "checking the base LM's perplexity on valid before anything is dumped"
        run "${EVAL[@]}" 2>&1 | tee "$out" >&2
        ppl=$(ppl_from "$out" lm)
        printf '%s\n%s\n' "$cmd" "$ppl" >"$done"
    fi
    ppl=$(tail -n 1 "$done")
    "$PYTHON" -c 'import sys; sys.exit(abs(float(sys.argv[1]) - float(sys.argv[2])) > float(sys.argv[3]))' \
        "$ppl" "$BASE_PPL_TARGET" "$BASE_PPL_TOLERANCE" ||
        die "BasePerplexityMismatch: $CKPT scores valid at perplexity $ppl, not $BASE_PPL_TARGET +- $BASE_PPL_TOLERANCE (BASE_PPL_TARGET, BASE_PPL_TOLERANCE): a wrong checkpoint, a dictionary other than the one it was trained with (DATA_BIN/dict.txt), or other evaluation settings. Nothing was dumped; see $out"
    log "base LM perplexity on valid: $ppl (target $BASE_PPL_TARGET +- $BASE_PPL_TOLERANCE)"
}

fmt() { printf '%.2f' "$1"; }  # perplexities in tables: two decimals, like the paper

dump_datastore() {  # PREFIX KEYTYPE [DATA]: keys and values of every training token
    local prefix=$1 keytype=$2 data=${3:-$DATA_BIN} fp16=()
    if [[ $DSTORE_FP16 == 1 ]]; then fp16=(--dstore-fp16); fi
    if [[ $LEGACY_DATASTORE == 1 ]]; then fp16+=(--legacy-datastore); fi
    # Before hours of dumping: it is the right model (first), and it has this key type.
    check_base_ppl
    require_keytype "$keytype"
    fairseq_args "$data" train "$DUMP_TOKENS_PER_SAMPLE" "$DUMP_CONTEXT_WINDOW" "$DUMP_BREAK_MODE"
    mkdir -p "$(dirname "$prefix")"
    step "${prefix}_meta.json" "$LOG_DIR/dump_$(basename "$prefix").log" "$CKPT" "$data/train.bin" -- \
        "${FAIRSEQ[@]}" --save-knnlm-dstore --dstore-mmap "$prefix" --knn-keytype "$keytype" "${fp16[@]}" --overwrite
}

build_index() {  # PREFIX INDEX: IVF + PQ over the datastore's keys
    step "$2.meta.json" "$LOG_DIR/index_$(basename "$2").log" "${1}_meta.json" -- \
        knnlm-build-index --dstore_mmap "$1" --faiss_index "$2" --factory "$INDEX_FACTORY" \
        --ncentroids "$NCENTROIDS" --code_size "$CODE_SIZE" --probe "$PROBE" --seed "$INDEX_SEED" \
        --num_keys_to_train "$NUM_KEYS_TO_TRAIN" --sampler "$INDEX_SAMPLER" \
        "--gpu=$([[ $INDEX_GPU == 1 ]] && echo true || echo false)" --overwrite
}

ensure_knn() {  # PREFIX INDEX KEYTYPE [DATA]: dump and index, each skipped while up to date
    dump_datastore "$1" "$3" "${4:-$DATA_BIN}"
    build_index "$1" "$2"
}

knn_export() {  # NAME DATA SPLIT PREFIX INDEX KEYTYPE: per-token export at k = K, in $EXPORT_DIR/NAME
    local dir=$EXPORT_DIR/$1
    eval_args "$2" "$3"
    knn_args "$4" "$5" "$6"
    mkdir -p "$dir"
    step "$dir/meta.json" "$LOG_DIR/export_$1.log" "$CKPT" "$2/$3.bin" "${4}_meta.json" "$5.meta.json" -- \
        "${EVAL[@]}" "${KNN[@]}" --knnlm-dump-probs "$dir" --overwrite
}

dstore_size() { json_get "${1}_meta.json" size; }
