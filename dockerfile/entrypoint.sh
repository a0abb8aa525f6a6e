#!/usr/bin/env bash
# Entrypoint of the cluster image. With LOCAL_UID (and optionally LOCAL_GID) set, the command runs as
# that user, so checkpoints and logs written to mounted volumes belong to you rather than to root;
# otherwise it runs as the container's user. Either way it then runs the command it was given.
set -euo pipefail

if [[ -n "${LOCAL_UID:-}" && "$(id -u)" == 0 ]]; then
  LOCAL_GID=${LOCAL_GID:-$LOCAL_UID}
  getent group "$LOCAL_GID" >/dev/null || groupadd --gid "$LOCAL_GID" trainer
  id -u "$LOCAL_UID" >/dev/null 2>&1 || useradd --uid "$LOCAL_UID" --gid "$LOCAL_GID" --create-home --shell /bin/bash trainer
  export HOME=$(getent passwd "$LOCAL_UID" | cut -d: -f6)
  exec gosu "$LOCAL_UID:$LOCAL_GID" "$@"
fi
exec "$@"
