# Two entry points (see README): `make demo` runs the whole job, `make test` runs every test.
SHELL := /bin/bash
ROVER_CACHE ?= $(HOME)/.cache/rover
export ROVER_CACHE
VENV := $(ROVER_CACHE)/venv
PY := $(VENV)/bin/python
# lerobot / datasets / torch caches stay inside the project cache: runs are self-contained and offline.
export HF_HOME := $(ROVER_CACHE)/huggingface
export TORCH_HOME := $(ROVER_CACHE)/torch
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export HF_DATASETS_DISABLE_PROGRESS_BARS := 1
# Ansible's fact cache (ansible.cfg names ~/.cache/rover/ansible-facts) follows ROVER_CACHE.
export ANSIBLE_CACHE_PLUGIN_CONNECTION := $(ROVER_CACHE)/ansible-facts
export PATH := $(VENV)/bin:$(PATH)
OUT ?= out

.PHONY: setup demo test lint unit molecule collection firmware fleet-up fleet-down fleet-status monitor-up monitor-down
setup:
	@scripts/bootstrap.sh

demo: setup
	OUT=$(OUT) scripts/demo.sh

lint: setup
	ruff check .
	ruff format --check .
	mypy
	ansible-lint --profile production --offline -q

unit: setup
	pytest -m "not fleet and not arm64 and not vm"

test: setup
	scripts/run-tests.sh

molecule: setup
	molecule test

# The roles, playbooks and plugins as the Ansible collection rover.fleet: out/dist/rover-fleet-<version>.tar.gz
collection: setup
	ansible-galaxy collection build --force --output-path out/dist

firmware:
	$(MAKE) -C firmware

# The simulated fleet on its own (docs/simulation.md); `make demo` uses the fleet named demo.
FLEET ?= demo
fleet-up: setup
	$(PY) -m simfleet up --name $(FLEET) --inventory inventory/sim/hosts.yml
fleet-down:
	$(PY) -m simfleet down --name $(FLEET)
fleet-status:
	$(PY) -m simfleet status --name $(FLEET)

# The fleet's monitor (docs/monitoring.md): Prometheus for the inventory's cars, on this controller (or the
# inventory's monitor host); a managed process where there is no systemd. `make demo` starts it.
INVENTORY ?= inventory/sim/hosts.yml
monitor-up: setup
	ansible-playbook playbooks/monitor.yml -i $(INVENTORY)
monitor-down:
	ansible-playbook playbooks/monitor.yml -i $(INVENTORY) -e rover_monitor_state=stopped
