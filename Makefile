# The README's commands: `make demo`, `make lab` (tutorials and assignments in JupyterLab) and `make test`;
# `make course` for instructors. Each creates or updates .venv first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, with exact pins: pip takes these wheels from the local disk on the project's machines.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
SHARED_DATA ?= ../shared/data
FASTAI_HOME ?= $(HOME)/.fastai
export FASTAI_HOME

.PHONY: demo lab course test venv data readme notebooks clean-venv

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e ".[dev,course]"
	@touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/corrprune-demo

# JupyterLab on nbs/ (or LAB_DIR) with this environment's kernel, which has the package: open tutorials/ or assignments/.
# LAB_ARGS="--no-browser --port 8890" for a remote machine; IN_TEST=1 make lab for the small configurations.
LAB_DIR ?= nbs
LAB_ARGS ?=
# (Jupyter refuses to run as root unless told to: containers often run as root, so say it for them.)
lab: venv
	$(VENV)/bin/jupyter lab --notebook-dir=$(LAB_DIR) $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

# For instructors: an nbgrader course directory with every assignment released (student versions in
# $(COURSE)/release/). Then `corrprune-course submit|autograde|feedback|grades` (see the README, For instructors).
COURSE ?= course
course: venv
	$(VENV)/bin/corrprune-course init $(COURSE)
	$(VENV)/bin/corrprune-course release $(COURSE)

# Put MNIST and CIFAR-10 where untar_data finds them: from the archives beside the repo if present, else download.
data: venv
	@mkdir -p "$(FASTAI_HOME)/data"
	@for pair in mnist_png:mnist cifar10:cifar10; do \
	  dir=$${pair%%:*}; name=$${pair##*:}; \
	  if [ -d "$(FASTAI_HOME)/data/$$dir" ]; then echo "data: $$dir already in $(FASTAI_HOME)/data"; \
	  elif [ -f "$(SHARED_DATA)/$$dir.tgz" ]; then echo "data: extracting $(SHARED_DATA)/$$dir.tgz"; \
	    tar -xzf "$(SHARED_DATA)/$$dir.tgz" -C "$(FASTAI_HOME)/data"; \
	  else $(PY) -c "from corrprune_edu.data import dataset_path; print('data:', dataset_path('$$name'))"; fi; \
	done

test: venv data
	$(PY) tools/check_sync.py
	$(PY) -m pytest

readme: venv
	$(PY) tools/make_readme.py

# Re-execute notebooks so their stored outputs (shown in the docs) are current: make notebooks NBS="nbs/api/03_flops.ipynb"
NBS ?= nbs/index.ipynb nbs/api/*.ipynb nbs/tutorials/*.ipynb
notebooks: venv
	$(PY) tools/execute_nbs.py $(NBS)
	$(VENV)/bin/nbdev-clean

clean-venv:
	rm -rf $(VENV)
