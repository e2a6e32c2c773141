# `make test` and `make demo` work in a fresh clone with only Python and PyPI: they create the
# environments. Two, because torch-xla 2.9.0 (its last release) needs exactly torch 2.9.0:
#   .venv         torch-xla and its torch 2.9.0: runtime.device xla (the demo, the XLA tests)
#   .venv-native  PyPI's current torch, and TorchTPU where it installs: the native backend
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NATIVE_VENV := .venv-native
NATIVE_BIN := $(NATIVE_VENV)/bin
NATIVE_STAMP := $(NATIVE_VENV)/.installed
# The newest torch this machine's package mirror holds for Python 3.11 (PyPI's is 2.15); the
# package itself has no upper pin. torch-tpu 0.2.0 supports torch 2.11 to 2.15.
NATIVE_TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: chromium install lint test test-xla test-native test-fast demo bench bench-backends bench-gpu bench-eval-overlap bench-backbones bench-ratios bench-recipes clean

# --no-cache-dir: the wheels (torch's CUDA build, several GB) are not kept a second time in
# pip's cache; a CI run on a full disk failed with ENOSPC during this install.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-cache-dir -e '.[dev,xla]'
	touch $(STAMP)

# torch first, pinned, so that the package's unpinned torch does not pick another build. TorchTPU
# is a CPython 3.11 wheel: elsewhere it is left out (its tests then check its absence).
$(NATIVE_STAMP): pyproject.toml
	test -x $(NATIVE_BIN)/python || $(PYTHON) -m venv $(NATIVE_VENV)
	$(NATIVE_BIN)/python -m pip install --quiet --upgrade pip
	$(NATIVE_BIN)/python -m pip install --quiet --no-cache-dir $(NATIVE_TORCH)
	$(NATIVE_BIN)/python -m pip install --quiet --no-cache-dir -e '.[dev]' $(NATIVE_TORCH)
	if $(NATIVE_BIN)/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then \
		$(NATIVE_BIN)/python -m pip install --quiet --no-cache-dir 'torch-tpu>=0.2.0' $(NATIVE_TORCH); fi
	touch $(NATIVE_STAMP)

install: $(STAMP) $(NATIVE_STAMP)

# Everything: lint, format and the layer contracts (seconds), then both environments' tests:
# the end-to-end ones on the CPU XLA device, then the native backend's (torch.compile, gloo).
# Each environment's suite drives the other's CLI once (a checkpoint across backends).
test: lint test-xla test-native

# The report test screenshots a page in headless Chromium, from Debian's packages: installed
# here when missing (as root, or with sudo that needs no password), else one line saying how.
chromium:
	@command -v chromium >/dev/null || { \
		if [ "$$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo -n"; fi; \
		echo "make: installing Debian's chromium for the report test"; \
		{ $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq chromium >/dev/null; } \
		|| { echo "make: the report test needs Chromium: run 'apt-get install chromium' as root, then make test again" >&2; exit 1; }; }

test-xla: $(STAMP) $(NATIVE_STAMP) chromium
	PJRT_DEVICE=CPU RETINANET_NATIVE_ENV=$(abspath $(NATIVE_BIN)) $(BIN)/python -m pytest -q

test-native: $(STAMP) $(NATIVE_STAMP)
	RETINANET_XLA_ENV=$(abspath $(BIN)) $(NATIVE_BIN)/python -m pytest -q -m "not xla"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# Eager unit tests only (seconds): the math, without XLA compilation or torch.compile.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not xla and not native"

# Train the smoke model on the synthetic dataset on CPU XLA, evaluate it, and export it to ONNX
# checked against the package (about 10 minutes on a 2-core CPU after the one-time install).
demo: $(STAMP)
	@if [ -d runs/demo ]; then echo "make demo: replacing the previous demo run in runs/demo"; fi
	rm -rf runs/demo
	PJRT_DEVICE=CPU $(BIN)/retinanet-xla train configs/smoke.yaml --output runs/demo
	PJRT_DEVICE=CPU $(BIN)/retinanet-xla eval runs/demo
	PJRT_DEVICE=CPU $(BIN)/retinanet-xla export runs/demo --format onnx --check
	@echo
	@echo "Done. Next, try:"
	@echo "  xdg-open runs/demo/report/index.html                    # the run's curves and predictions, one page, in a browser (macOS: open)"
	@echo "  $(BIN)/tensorboard --logdir runs/demo/tensorboard        # losses, learning rate, AP over steps, live"
	@echo "  PJRT_DEVICE=CPU $(BIN)/retinanet-xla predict runs/demo YOUR_IMAGE.jpg --output runs/demo/predict   # your own picture"

# Benchmarks; record the results in docs/performance.md with the machine and date.
bench: $(STAMP)
	$(BIN)/retinanet-xla data bench --image-size 640 --images 200
	PJRT_DEVICE=CPU $(BIN)/retinanet-xla bench configs/smoke.yaml --steps 20 --json runs/bench/smoke-xla.json
	PJRT_DEVICE=CPU $(BIN)/retinanet-xla bench configs/640-3x.yaml --steps 4 --set 'data.image_size=[256,256]' --set train.batch_size=8 --set model.backbone.weights=null --set runtime.num_devices=1 --json runs/bench/640-3x-trace.json
	PJRT_DEVICE=CPU $(BIN)/retinanet-xla bench configs/640-3x.yaml --steps 8 --trace-only --set 'data.image_size=[256,256]' --set train.batch_size=8 --set model.backbone.weights=null --set runtime.num_devices=1 --json runs/bench/640-3x-trace-only.json
	$(BIN)/python benchmarks/gcs_reads.py --pairs 3 --latency-ms 30 --json runs/bench/gcs-reads.json
	PJRT_DEVICE=CPU $(BIN)/retinanet-xla bench configs/smoke.yaml --steps 40 --input-pipeline --json runs/bench/smoke-xla-pipeline.json
	$(BIN)/retinanet-xla bench configs/smoke.yaml --steps 20 --set runtime.device=cpu --json runs/bench/smoke-eager-cpu.json
	PJRT_DEVICE=CPU $(BIN)/python benchmarks/torchvision_retinanet.py --config configs/smoke.yaml --steps 3 --json runs/bench/torchvision-vs-ours.json
	rm -rf runs/bench/train-with-eval
	PJRT_DEVICE=CPU $(BIN)/retinanet-xla train configs/smoke.yaml --output runs/bench/train-with-eval --set train.steps=60 --set train.eval_every=30 --set train.log_every=20 > /dev/null
	cp runs/bench/train-with-eval/summary.json runs/bench/train-with-eval.json
	PJRT_DEVICE=CPU $(BIN)/python benchmarks/optimizers_xla.py --json runs/bench/optimizers-xla.json
	$(BIN)/python benchmarks/startup.py --json runs/bench/startup.json

# The step on every backend of this machine, in alternating pairs: XLA:CPU, native eager, native
# torch.compile and torchvision's eager RetinaNet; smoke and 640-3x at 256 px (docs/performance.md).
bench-backends: $(STAMP) $(NATIVE_STAMP)
	$(BIN)/python benchmarks/backends.py --pairs 2 --json runs/bench/backends.json

# One GPU (the native environment on a CUDA machine; ~8 minutes): 640-3x at batch 16 and 32, ours
# eager bf16, compiled, compiled with CUDA graphs, and torchvision's RetinaNet with AMP: images/s,
# utilisation, peak memory (docs/performance.md, "GPU benchmark").
bench-gpu: $(NATIVE_STAMP)
	$(NATIVE_BIN)/python benchmarks/gpu.py --json runs/bench/gpu.json --markdown runs/bench/gpu.md

# Training with evaluations, this checkout against BASELINE (a checkout of an earlier commit), in
# alternating pairs on CPU XLA and native CPU (docs/performance.md, "Evaluation overlapping training").
bench-eval-overlap: $(STAMP) $(NATIVE_STAMP)
	@test -n "$(BASELINE)" || { echo "make bench-eval-overlap BASELINE=DIR: a checkout to compare with (git worktree add DIR COMMIT)" >&2; exit 2; }
	$(BIN)/python benchmarks/eval_overlap.py --baseline $(BASELINE) --pairs 2 --json runs/bench/eval-overlap-xla.json
	$(NATIVE_BIN)/python benchmarks/eval_overlap.py --baseline $(BASELINE) --device cpu --pairs 2 --json runs/bench/eval-overlap-cpu.json

# Every backbone: parameters, FLOPs at 640, smoke-batch step eager and on CPU XLA (docs/models.md; ~25 min).
bench-backbones: $(STAMP)
	PJRT_DEVICE=CPU $(BIN)/python benchmarks/backbones.py --steps 6 --json runs/bench/backbones.json

# Every backbone's XLA:CPU step against its eager step at 256x256, batch 4, in alternating pairs
# (docs/models.md; 30 minutes to 2 hours on a 2-core VM, by its speed).
bench-ratios: $(STAMP)
	PJRT_DEVICE=CPU $(BIN)/python benchmarks/xla_vs_eager.py --pairs 2 --json runs/bench/xla-vs-eager.json

# The recipe ablation: each variant of benchmarks/recipes.py x 2 seeds on the synthetic data,
# trained and evaluated (docs/models.md, "Recipes"; about 4 minutes a run on a 2-core VM).
bench-recipes: $(STAMP)
	PJRT_DEVICE=CPU $(BIN)/python benchmarks/recipes.py --output runs/recipes --steps 200 --json runs/recipes/recipes.json --markdown runs/recipes/recipes.md

clean:
	rm -rf $(VENV) $(NATIVE_VENV) build dist *.egg-info .pytest_cache
