# The stable interface of the pipeline. Every variable can be set on the
# command line, for example: make features DATA=~/dogs BACKBONE=mobilenet
PYTHON_BOOT ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

DATA ?= data
FEATURES ?= features
BACKBONE ?= inception_resnet_v2
WEIGHTS ?= imagenet
SPLITS ?= train test
PRECISION ?= auto
TTA ?= none
ENGINE ?= local
BATCH_SIZE ?=
RAY_ACTORS ?=
RAY_CPUS_PER_WORKER ?=
FORCE ?=

CLASSIFIER ?= logreg
MODELS ?= models
RUN ?=
FOLDS ?= 5
SEED ?= 0
SUBMISSION ?= submission.csv

FORCE_FLAG := $(if $(filter 1 yes true,$(FORCE)),--force,)
BATCH_FLAG := $(if $(BATCH_SIZE),--batch-size $(BATCH_SIZE),)
RAY_FLAGS := $(if $(RAY_ACTORS),--ray-actors $(RAY_ACTORS),) $(if $(RAY_CPUS_PER_WORKER),--ray-cpus-per-worker $(RAY_CPUS_PER_WORKER),)
RUN_FLAG := $(if $(RUN),--run $(RUN),)

.PHONY: install demo test features train submit bench clean-demo

# The virtual environment is updated whenever a requirements file changes.
# Ray is an optional extra: only the tests and ENGINE=ray install it.
$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	touch $@

$(VENV)/.installed-ray: $(VENV)/.installed requirements-ray.txt
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-ray.txt
	touch $@

RAY_INSTALL := $(if $(filter ray,$(ENGINE)),$(VENV)/.installed-ray,)

install: $(VENV)/.installed

demo: install
	$(PY) -m pipeline demo

test: install $(VENV)/.installed-ray
	$(PY) -m pytest -q tests

features: install $(RAY_INSTALL)
	$(PY) -m pipeline features --data $(DATA) --features $(FEATURES) \
	  --backbone $(BACKBONE) --weights $(WEIGHTS) --splits $(SPLITS) \
	  --precision $(PRECISION) --tta $(TTA) --engine $(ENGINE) $(BATCH_FLAG) $(RAY_FLAGS) $(FORCE_FLAG)

train: install
	$(PY) -m pipeline train --data $(DATA) --features $(FEATURES) \
	  --backbone "$(BACKBONE)" --classifier $(CLASSIFIER) --models $(MODELS) \
	  --folds $(FOLDS) --seed $(SEED) $(RUN_FLAG)

submit: install
	$(PY) -m pipeline submit --data $(DATA) --features $(FEATURES) \
	  --models $(MODELS) --output $(SUBMISSION) $(RUN_FLAG)
