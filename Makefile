.PHONY: setup main test test-fast sync-notebooks bench mutation
setup:          ; bash scripts/run.sh setup
main:           ; bash scripts/run.sh main
test:           ; bash scripts/run.sh test
test-fast:      ; bash scripts/run.sh test -m "not slow and not notebooks"
sync-notebooks: ; .venv/bin/jupytext --sync notebooks/*.py
bench:          ; .venv/bin/python -m benchmarks.run_all
mutation:       ; bash scripts/mutation.sh $(MODULE)  # MODULE=diff|steps|advantages|losses|correct|sampling|sampler-token
