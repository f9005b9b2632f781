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
# Classifier options beyond the variables above, for example
# TRAIN_ARGS="--C 0.05" or TRAIN_ARGS="--learning-rate 0.1 --pca-components 128".
TRAIN_ARGS ?=

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
	  --folds $(FOLDS) --seed $(SEED) $(RUN_FLAG) $(TRAIN_ARGS)

submit: install
	$(PY) -m pipeline submit --data $(DATA) --features $(FEATURES) \
	  --models $(MODELS) --output $(SUBMISSION) $(RUN_FLAG)

# Benchmarks: writes docs/benchmarks.md (about 25 minutes on 2 cores).
# BENCH_IMAGES sets the inception_resnet_v2 comparison size; BENCH_FULL=1
# runs every naive fold, naive LightGBM at full scale included (hours on 2
# cores); BENCH_ARGS passes more options (see python -m bench --help).
BENCH_DATA ?= ../shared/data/dogs-dev
BENCH_IMAGES ?= 96
BENCH_REPEATS ?= 3
BENCH_FULL ?=
BENCH_ARGS ?=

bench: install
	$(PY) -m bench --data $(BENCH_DATA) --images $(BENCH_IMAGES) --repeats $(BENCH_REPEATS) \
	  $(if $(filter 1 yes true,$(BENCH_FULL)),--full,) $(BENCH_ARGS)
