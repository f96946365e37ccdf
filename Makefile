# make demo: tiny CPU demo (synthetic FSC-147 + tiny random Qwen2-VL, real 4-bit QLoRA path)
# make test: the test suite
# Both create .venv from requirements.txt when it is missing or older than requirements.txt.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.requirements-installed

.PHONY: demo test venv clean-demo

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
