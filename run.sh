#!/usr/bin/env bash
# What `docker compose up` does, without Docker, on a machine with Python 3.11+:
# a .venv with the project, a checkpoint trained once into checkpoints/spamgpt, the API on 127.0.0.1:8000.
#
#   ./run.sh                                   fine-tune pretrained GPT-2 (downloaded once), then serve
#   SPAMGPT_INIT=random ./run.sh               random initial weights, where GPT-2's cannot be downloaded
#                                              (add SPAMGPT_TRAINABLE=all: random blocks are poor frozen features);
#                                              no network needed once .venv is installed: the data is packaged
#   ./run.sh --data my.csv --trainable all     extra arguments go to `spamgpt train`
#
# Environment, as in docker-compose.yml: SPAMGPT_INIT (pretrained | random), SPAMGPT_TRAINABLE (last-blocks | all
# | lora), SPAMGPT_PRESET (gpt2), SPAMGPT_EPOCHS (5), SPAMGPT_TRAIN_DEVICE (auto), SPAMGPT_PORT (8000); PYTHON
# (python3) makes the .venv.
# The server reads every other SPAMGPT_* setting (docs/serving.md: Configuration), SPAMGPT_CHECKPOINT_DIR included.
set -euo pipefail
cd "$(dirname "$0")"

# Install when the .venv is new or pyproject.toml / the torch pin changed since the last install.
torch_version=$(sed -n 's/^ARG TORCH_VERSION=//p' Dockerfile)  # one pin, the Dockerfile's
[[ -x .venv/bin/python ]] || "${PYTHON:-python3}" -m venv .venv
. .venv/bin/activate
installed="torch==$torch_version $(sha256sum pyproject.toml)"
if [[ $(cat .venv/.spamgpt-installed 2>/dev/null) != "$installed" ]]; then
  pip install "torch==$torch_version" -e '.[plots]'
  echo "$installed" >.venv/.spamgpt-installed
fi

export SPAMGPT_CHECKPOINT_DIR=${SPAMGPT_CHECKPOINT_DIR:-checkpoints/spamgpt}
# --skip-existing: exits at once when the checkpoint there was trained with these arguments on this data (and
# replaces one of other arguments or data); --resume: continues a run that was interrupted (Ctrl-C, a crash) after
# its last completed epoch, or starts one when there is none. Pass --no-resume --overwrite to start over instead.
spamgpt train --out "$SPAMGPT_CHECKPOINT_DIR" --skip-existing --resume \
  --init "${SPAMGPT_INIT:-pretrained}" --trainable "${SPAMGPT_TRAINABLE:-last-blocks}" \
  --preset "${SPAMGPT_PRESET:-gpt2}" --epochs "${SPAMGPT_EPOCHS:-5}" --device "${SPAMGPT_TRAIN_DEVICE:-auto}" "$@"

# The image's server, on loopback.
exec spamgpt serve --host 127.0.0.1 --port "${SPAMGPT_PORT:-8000}"
