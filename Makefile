# The two set-up commands (see README): `make start` and `make test`.
# Both create or reuse .venv/ via scripts/bootstrap (torch first, from the local CPU build).

PYTEST_ARGS ?=

.PHONY: start test bootstrap bench clean

bootstrap:
	@./scripts/bootstrap

## Prepare what is missing (base models, registry, demo experts, router, calibrator), then serve: `mose up`.
start: bootstrap
	@.venv/bin/mose up

## Run the whole test suite (unit + integration) on real models and a real registry.
test: bootstrap
	@.venv/bin/python -m pytest -q -ra $(PYTEST_ARGS)

clean:
	rm -rf .mose .mose-cache .pytest_cache
