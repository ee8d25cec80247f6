# One entry point: `make demo` runs the main job, `make test` the tests, `make bench` the benchmark,
# `make frontier` the efficient methods' speed/perplexity frontier.
# Every target creates the virtual environment first if it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# FAISS=cpu (default) | gpu-cu12 | gpu-cu13 | auto (from the CUDA torch reports; gpu = gpu-cu12)
FAISS ?= cpu

.PHONY: install test demo analyses bench frontier clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of torch 2.13 (a newer torch would pull gigabytes of CUDA on a CPU machine).
	$(PY) -m pip install -q torch==2.13.0
	# fairseq 0.12.2 does not build or import on Python 3.11; ve-fairseq is a wheel of its
	# main branch. --no-deps: its torchaudio requirement would replace torch.
	$(PY) -m pip install -q --no-deps ve-fairseq==0.12.3
	# The hf extra (transformers, tokenizers) installs beside torch 2.13 without replacing it.
	# The ray extra (Ray Core, ~245 MiB, ~10 s more) serves --knn-executor ray and knnlm-shard-dump.
	# FAISS=auto: torch.version.cuda 12.x -> faiss-gpu-cu12, 13.x -> faiss-gpu-cuvs, none -> faiss-cpu.
	@extra=$(FAISS); \
	if [ "$$extra" = auto ]; then \
	    extra=$$($(PY) -c 'import torch; v = torch.version.cuda or ""; print({"12": "gpu-cu12", "13": "gpu-cu13"}.get(v.split(".")[0], "cpu"))'); \
	    echo "FAISS=auto: torch $$($(PY) -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)') -> $$extra"; \
	fi; \
	case "$$extra" in cpu|gpu|gpu-cu12|gpu-cu13) ;; \
	    *) echo "FAISS must be cpu, gpu-cu12, gpu-cu13 or auto, got '$$extra'" >&2; exit 2;; esac; \
	echo "$(PY) -m pip install -q -e '.[$$extra,dev,hf,ray]'"; \
	$(PY) -m pip install -q -e ".[$$extra,dev,hf,ray]"
	touch $@

# Two workers, one test file each at a time (a file's fixtures are built once): most tests wait on
# fairseq's start-up or run one thread, so two at once use both cores.
# In a network namespace of its own (tools/netns.sh): the Ray tests' simulated cluster binds
# loopback, and nothing a test starts can reach the network.
test: $(STAMP)
	tools/netns.sh $(PY) -m pytest -q -n 2 --dist loadfile

demo: $(STAMP)
	$(PY) -m knnlm.experiments.demo $(ARGS)

analyses: $(STAMP)
	$(PY) -m knnlm.experiments.analyses $(ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks.run $(ARGS)

# The efficient kNN-LM methods side by side on the demo's outputs (run `make demo` first).
frontier: $(STAMP)
	$(PY) -m benchmarks.frontier $(ARGS)

clean:
	rm -rf $(VENV) demo_runs bench_runs
