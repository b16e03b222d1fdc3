# migrate: `make demo` runs the main job, `make test` passes the tests.
# Both set themselves up on a fresh machine (pip, apt-get if gcc is missing).
PYTHON ?= python3
PYTEST_ARGS ?=
# Bytecode caches (git-ignored) spare every `migrate` command ~0.4 s of compiling.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: all setup build protos programs test unit integration demo bench soak clean \
	rig-up rig-down

all: build

setup: .setup-done

.setup-done: pyproject.toml scripts/setup.sh
	./scripts/setup.sh
	touch .setup-done

protos: setup
	$(PYTHON) -m grpc_tools.protoc -Imigrate/images/proto --python_out=migrate/images \
		migrate/images/proto/*.proto

programs: setup
	$(MAKE) -C tests/programs

build: protos programs

test: build
	$(PYTHON) -m pytest -q tests $(PYTEST_ARGS)

unit: build
	$(PYTHON) -m pytest -q tests/unit $(PYTEST_ARGS)

integration: build
	$(PYTHON) -m pytest -q tests/integration $(PYTEST_ARGS)

# The long runs: every workload through 200 dump/restore cycles.
soak: build
	MIGRATE_CYCLES=200 $(PYTHON) -m pytest -q tests/integration $(PYTEST_ARGS)

demo: build
	$(PYTHON) scripts/demo.py

bench: build
	$(PYTHON) bench/dump_restore.py
	$(PYTHON) bench/predump.py
	$(PYTHON) bench/pageserver.py

# The two-host rig (docs/rig.md): hosts A, B, C in namespaces, an agent each.
rig-up: build
	$(PYTHON) deploy/rig/rig.py up

rig-down:
	$(PYTHON) deploy/rig/rig.py down

clean:
	$(MAKE) -C tests/programs clean
	rm -f migrate/images/*_pb2.py .setup-done
	rm -rf build *.egg-info .pytest_cache
