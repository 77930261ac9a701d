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

# The main job on the embedded default (local Ray, 2 workers) over the real coco_mini images:
# HSNet COCO-20i lists mapped to the images at hand, seeded 1-shot episodes, HSNet metric.
demo: setup
	$(BIN)/python jobs/evaluate_coco20i.py \
		--annotations $(SHARED)/data/coco_mini/instances.json \
		--images $(SHARED)/data/coco_mini/images \
		--lists-dir $(SHARED)/data/splits/coco20i_hsnet \
		--backbone-checkpoint $(SHARED)/weights/mobilenet_v2_imagenet.pth \
		--folds 0 1 2 3 --n-episodes 100 --output-dir outputs/demo

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) outputs
