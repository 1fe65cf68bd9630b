# SciAssist: `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# A machine with an NVIDIA driver gets PyPI's (CUDA) torch; any other gets the pinned
# build, which is a CPU build where a local wheel or TORCH_INDEX provides one, e.g.
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch>=2.9,torch==2.13.0)
TORCH_INDEX ?=
# The second and third test environments (make test-colab, make test-newest).
# (pyenv's shim for python3.13 exists but fails unless 3.13 is the active version: ask the interpreter itself)
PYTHON313 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python3.13) \
	$(shell python3.13 -c 'import sys; print(sys.executable)' 2>/dev/null))
COLAB_VENV ?= .venv-colab
NEWEST_VENV ?= .venv-newest
# Empty variables pass no flag: the commands' own defaults apply (their --help lists them).
MODEL ?= d20
SCIENCEQA ?= hf
NGPUS ?= 8
SPLIT ?= val
PRESET ?= cpu
SOURCE ?=
DATA ?=
OUTPUT_TAG ?=
RUN ?=
RL ?=
BASE_DIR ?=
ARGS ?=
APPEND ?=
BASE_DIR_FLAG = $(if $(BASE_DIR),--base_dir "$(BASE_DIR)")
TRAIN_FLAGS = $(if $(DATA),--data_path $(DATA)) $(if $(SOURCE),--source $(SOURCE)) --model_tag $(MODEL) \
	$(BASE_DIR_FLAG) $(if $(OUTPUT_TAG),--output_tag $(OUTPUT_TAG))

.PHONY: help install download data finetune finetune-multi evaluate chat chat-web demo notebook recipe-cpu recipe-gpu test test-envs test-colab test-newest test-wheel lint bench plan bench-gpu rehearse-d20 clean

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'
	@echo "Variables: MODEL=d20|d32 (download, finetune) SOURCE=base|mid|sft|rl SCIENCEQA=hf|sample|DIR DATA=file.jsonl"
	@echo "           OUTPUT_TAG=NAME RUN=DIR (the run to evaluate) RL=DIR (an RL run to evaluate too) BASE_DIR=DIR"
	@echo "           NGPUS=8 SPLIT=val|test"
	@echo "           APPEND=1 (rehearse-d20: also append to bench/RESULTS.md) ARGS='...'"

install: $(VENV)/.installed $(VENV)/bin/sciassist ## create .venv and install everything, this package too (CPU torch where there is no GPU)

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# This checkout itself, editable and without its dependencies (the rule above installed them):
# the `sciassist` command, and imports of this checkout from any folder.
$(VENV)/bin/sciassist: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q --no-deps -e .
	touch $@

download: install ## fetch a published checkpoint (MODEL=d20|d32) into BASE_DIR
	$(PY) -m sciassist.hub --model $(MODEL) $(BASE_DIR_FLAG)

data: install ## write data/scienceqa_{train,val,test}.jsonl (SCIENCEQA=hf|sample|DIR)
	$(PY) -m sciassist.data.prepare --scienceqa $(SCIENCEQA) --out_dir data/ $(ARGS)

finetune: install ## fine-tune on one GPU (DATA=file.jsonl; default: the prepared ScienceQA)
	$(PY) sciassist_train.py $(TRAIN_FLAGS) $(ARGS)

finetune-multi: install ## fine-tune on NGPUS GPUs with torchrun
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NGPUS) sciassist_train.py $(TRAIN_FLAGS) $(ARGS)

evaluate: install ## the newest fine-tuned run (or RUN=DIR) vs the model it started from; RL=DIR: base -> fine-tuned -> RL
	$(PY) sciassist_evaluate.py --finetuned $(or $(RUN),$(if $(RL),source,newest)) --base source $(if $(RL),--rl "$(RL)") $(BASE_DIR_FLAG) --split $(SPLIT) $(ARGS)

chat: install ## talk to the latest fine-tuned model in the terminal
	$(PY) -m sciassist.serve.chat_cli $(BASE_DIR_FLAG) $(ARGS)

chat-web: install ## serve the chat page on http://127.0.0.1:8000
	$(PY) -m sciassist.serve.web $(BASE_DIR_FLAG) $(ARGS)

demo: install ## the whole pipeline in miniature, offline, on CPU (SCIENCEQA=sample|DIR)
	$(PY) -m sciassist.pipelines.demo --scienceqa $(if $(filter hf,$(SCIENCEQA)),sample,$(SCIENCEQA)) $(ARGS)

notebook: install ## run the notebook in smoke mode with papermill (CPU, offline)
	$(VENV)/bin/papermill sciassist-fine-tune.ipynb notebook_output.ipynb -p SMOKE True --cwd .

recipe-cpu: install ## a CPU recipe end to end, budgeted in steps (SCIENCEQA=DIR, SPLIT=val|test|both, PRESET=cpu|cpu-lora|cpu-tutor|cpu-rl)
	$(PY) -m sciassist.pipelines.recipes --preset $(PRESET) --scienceqa $(SCIENCEQA) --out_dir runs/recipe-$(PRESET) --split $(SPLIT) $(ARGS)

recipe-gpu: install ## the GPU recipe (from-scratch model on one GPU; untested on real hardware)
	$(PY) -m sciassist.pipelines.recipes --preset gpu --scienceqa $(SCIENCEQA) --out_dir runs/recipe-gpu --split $(SPLIT) $(ARGS)

test: install ## run the test suite
	$(PY) -m pytest -q $(ARGS)

test-envs: $(COLAB_VENV)/.installed $(NEWEST_VENV)/.installed ## install the Colab and newest-torch test environments

test-colab: $(COLAB_VENV)/.installed ## the suite in Colab's GPU image versions: Python 3.13, torch 2.11 (CUDA build, run on the CPU), its transformers/datasets/hub/peft
	$(COLAB_VENV)/bin/python -m pytest -q $(ARGS)

$(COLAB_VENV)/.installed: ci/requirements-colab.txt requirements.txt requirements-dev.txt
	@test -n "$(PYTHON313)" || { echo "make test-colab needs Python 3.13 (python3.13 on PATH, or PYTHON313=/path/to/python3.13)"; exit 2; }
	test -x $(COLAB_VENV)/bin/python || $(PYTHON313) -m venv $(COLAB_VENV)
	bash ci/pip-install $(COLAB_VENV)/bin/python -q -r ci/requirements-colab.txt
	$(COLAB_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

test-newest: $(NEWEST_VENV)/.installed ## the suite with the newest torch these machines have (2.14.1) and the newest libraries
	$(NEWEST_VENV)/bin/python -m pytest -q $(ARGS)

$(NEWEST_VENV)/.installed: ci/requirements-newest.txt requirements.txt requirements-dev.txt
	test -x $(NEWEST_VENV)/bin/python || python3 -m venv $(NEWEST_VENV)
	bash ci/pip-install $(NEWEST_VENV)/bin/python -q -r ci/requirements-newest.txt
	$(NEWEST_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

lint: install
	$(VENV)/bin/ruff check .

test-wheel: install ## build the wheel, install it with the core dependencies only into .venv-wheel, run `sciassist`
	TORCH_SPEC="$(TORCH_SPEC)" bash ci/wheel-check $(PY) .venv-wheel

bench: install ## CPU benchmarks (tables on stdout)
	$(PY) bench/bench_gpt.py

plan: install ## the memory plan of d20/d32, full and LoRA r=16, on 16/24/40/80 GB cards, fine-tuning then RL (a run's own: sciassist_train.py ... --dry_run)
	$(PY) -m sciassist.train.plan --table
	@echo
	$(PY) -m sciassist.train.plan --rl --table

bench-gpu: install ## the GPU benchmark on a CUDA machine, at most ~8 min (OUT=DIR)
	$(PY) bench/gpu.py --out $(or $(OUT),bench_gpu) $(ARGS)

rehearse-d20: install ## a random d20 in the published layout through train/evaluate/chat on CPU (~3 min, ~9 GiB; APPEND=1: add the table to bench/RESULTS.md)
	$(PY) bench/rehearse_d20.py $(if $(APPEND),--append) $(ARGS)

clean: ## remove the virtual environments and run outputs
	rm -rf $(VENV) $(COLAB_VENV) $(NEWEST_VENV) .venv-wheel sciassist.egg-info finetuned_model_checkpoint eval_results demo_output notebook_output.ipynb .pytest_cache
