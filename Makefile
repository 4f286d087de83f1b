# One-command entry points (see README "Quick start").
#   make demo  - install, fetch the default checkpoint, track the sample clip
#   make test  - install (system packages too, when root) and run the test suite

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL  ?= sam2.1_hiera_tiny
# A 512 input: ~4 s/frame for the 3 objects on a 2-core CPU (measured); `make demo DEMO_ARGS=` runs
# the model's full 1024 (use that on a GPU).
DEMO_ARGS ?= --image-size 512
# torch/torchvision releases known to work together here; override to taste.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
APT_PACKAGES := libgl1 libglib2.0-0 xvfb xdotool python3-gi gir1.2-gst-rtsp-server-1.0 \
	gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly \
	gstreamer1.0-tools

.PHONY: demo test install install-test system-deps lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# SAM2_BUILD_CUDA=0: sam2's optional CUDA extension (hole filling) is not needed.
install: $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PINS)
	SAM2_BUILD_CUDA=0 $(BIN)/pip install -q -e .

install-test: install
	SAM2_BUILD_CUDA=0 $(BIN)/pip install -q -e '.[test]'

system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	else echo "not root: make sure these Debian packages are installed: $(APT_PACKAGES)"; fi

demo: system-deps install
	$(BIN)/streamtrack download $(MODEL)
	$(BIN)/streamtrack run demos/sample.mp4 --model $(MODEL) --prompts demos/sample_prompts.json \
		--save-jsonl runs/demo/results.jsonl --save-video runs/demo/overlay.mp4 $(DEMO_ARGS)

test: system-deps install-test
	$(BIN)/python -m pytest -q

lint: install-test
	$(BIN)/ruff check streamtrack tests
