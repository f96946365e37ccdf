# make demo: tiny CPU demo (synthetic FSC-147 + tiny random Qwen2-VL, real 4-bit QLoRA path)
# make test: the test suite
# make bench-speed / bench-learning / bench-learning-20min: the benchmarks quoted in RESULTS.md (CPU).
# make smoke-2b: the full-size Qwen2-VL-2B architecture (random weights) through the real path (CPU or GPU).
# make gpu-check: the prepared GPU check (one CUDA GPU; the Python that has torch, no venv; WHEELS=DIR for offline wheels).
# All create .venv from requirements.txt when it is missing or older than requirements.txt.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.requirements-installed

.PHONY: demo test venv clean-demo bench-speed bench-learning bench-learning-20min smoke-2b gpu-check

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -r requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	PYTHON=$(VENV)/bin/python ./run_sequential_attention.sh --demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

clean-demo:
	rm -rf demo runs/demo

# Cost ratios (~1 min).
bench-speed: $(STAMP)
	$(VENV)/bin/python bench_speed.py --out runs/bench_speed.json

# The synthetic counting benchmark's settings (RESULTS.md): 1-10 objects on plain backgrounds, 224 px
# images (objects at least about one image token wide), fresh images at every step, full fine-tuning of
# the tiny random backbone, jittered marks, half the not-done states one object from done.
BENCH_SETTINGS := --num_images 1500 --test_images 300 --image_size 224 --background plain --fresh_images \
	--finetune full --lr 3e-4 --mark_jitter 0.2 --near_done_fraction 0.5 --eval_every 400 --eval_images 40 \
	--tune_threshold 0.3,0.4,0.5,0.6,0.7,0.8,0.9

# The seed's simple model and the attention model, each with and without token pointing, under the same
# 20-minute training budget each (~100 min on 2 cores).
bench-learning: $(STAMP)
	$(VENV)/bin/python bench_learning.py --output_dir runs/bench_learning --steps 3700 --minutes 20 \
		--variants mean,simple,simple-token,attention,attention-token $(BENCH_SETTINGS)

# The best variant under the issue's budget: 20 minutes of training on 2 CPU cores (~25 min in all).
bench-learning-20min: $(STAMP)
	$(VENV)/bin/python bench_learning.py --output_dir runs/bench_learning_20min --steps 3700 --minutes 20 \
		--variants mean,simple-token $(BENCH_SETTINGS)

# Qwen2-VL-2B's architecture with random weights (built once into models/, ~4.4 GB) through the real
# 4-bit + LoRA path: one training step at batch 2 on 384 x 576 images, one counting step (CPU: ~15 min).
smoke-2b: $(STAMP)
	$(VENV)/bin/python smoke_2b.py --output_dir runs/smoke_2b

# On a machine with one CUDA GPU and nothing downloaded: Qwen2-VL-2B's architecture built there with random weights,
# through the real 4-bit + LoRA path; training steps at batch 2 on 384 x 576 images with and without gradient
# checkpointing, the bare backbone forward + backward, counting at batch 1 and 8, the dtypes computed in ->
# runs/gpu_check/gpu.json. Runs on the Python that already has torch (no venv, no W&B); names any missing package,
# and installs missing ones from a folder of wheels with WHEELS=DIR. Stops with a message without a GPU.
gpu-check:
	$(PYTHON) smoke_2b.py --gpu_check --output_dir runs/gpu_check $(if $(WHEELS),--wheels $(WHEELS),)
