# Two commands do all the set-up on a fresh machine (see README.md):
#   make demo   - create .venv, install the pinned stack, run the main job on the embedded local Ray
#   make test   - create .venv, install the pinned stack, run the test suite
PYTHON ?= python3
VENV ?= .venv
SHARED ?= ../shared
BIN := $(VENV)/bin

.PHONY: setup demo test clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# tested versions pinned in constraints.txt (torch + torchvision as a matching pair, see docs/stack.md)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

setup: $(BIN)/.installed

# The main job on the embedded default (local Ray, 2 workers, MLflow in ./mlflow.db): extract the stores
# once, train VRP-SAM on COCO-20i fold 0's base classes against the proxy SAM, test on fold 0's novel
# classes (HSNet lists mapped to the coco_mini images) next to the untrained model and a training-free
# baseline. Short schedule for a 2-core CPU (the paper's recipe is 50 epochs on all of COCO).
DEMO_TRAINING = --method vrp_sam --folds 0 --epochs 4 --episodes-per-epoch 240 --lr 5e-4 \
	--val-episodes 48 --test-episodes 300
demo: setup
	$(BIN)/python jobs/train_coco20i.py \
		--annotations $(SHARED)/data/coco_mini/instances.json \
		--images $(SHARED)/data/coco_mini/images \
		--lists-dir $(SHARED)/data/splits/coco20i_hsnet \
		--backbone-checkpoint $(SHARED)/weights/mobilenet_v2_imagenet.pth \
		$(DEMO_TRAINING) --extract-missing --evaluate-untrained --baseline prototype_matching \
		--output-dir outputs/demo

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) outputs stores mlflow.db mlruns
