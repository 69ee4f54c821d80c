#!/usr/bin/env bash
# The shipped PanWorld models (checkpoints/panworld/), stage by stage: the df21_w256 teacher of
# configs/panworld_teacher_search.py -> ODE init (a window student) -> self-forcing DMD of the
# window / sink / ema_sink / full students from the ODE init -> the adastate student from the
# window student (the paper's path) -> evaluation of all of them -> ship.
#
#   bash launch/panworld_models.sh RUN_DIR [STAGE ...]     # run (or resume) everything, or some stages
#   STAGES: teacher ode dmd_window dmd_sink dmd_ema_sink dmd_full dmd_adastate eval ship
#
# Re-running skips every stage whose export exists (launch/train.py resumes a killed stage from its
# checkpoints). Steps per stage: TEACHER_STEPS, ODE_STEPS, DMD_STEPS (environment; defaults below);
# EVAL_FLAGS adds launch/evaluate.py flags. Run from the repository root; RUN_DIR is best relative.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:?usage: bash launch/panworld_models.sh RUN_DIR [STAGE ...]}
shift
STAGES=("$@")
[ ${#STAGES[@]} -gt 0 ] || STAGES=(teacher ode dmd_window dmd_sink dmd_ema_sink dmd_full dmd_adastate eval ship)
CFG=configs/panworld_teacher_search.py:df21_w256
TEACHER_STEPS=${TEACHER_STEPS:-1200}
ODE_STEPS=${ODE_STEPS:-200}
DMD_STEPS=${DMD_STEPS:-100}
mkdir -p "$RUN"

train() {  # train NAME CONFIG_ARGS FLAGS...: launch/train.py into RUN/NAME unless RUN/NAME/export exists
  local name=$1 args=$2; shift 2
  if [ -f "$RUN/$name/export/info.json" ]; then echo "[models] $name: done ($RUN/$name/export)"; return; fi
  echo "[models] $name: python launch/train.py --config=$CFG$args $* --workdir=$RUN/$name"
  python launch/train.py --config="$CFG$args" "$@" --workdir="$RUN/$name"
}

dmd() {  # dmd POLICY INIT_DIR [FLAGS...]
  local policy=$1 init=$2; shift 2
  train "dmd_$policy" ",dmd,$policy" --config.train.steps="$DMD_STEPS" \
    --config.train.teacher_path="$RUN/teacher/export" --config.train.init_from="$init" "$@"
}

for stage in "${STAGES[@]}"; do
  case $stage in
    teacher) train teacher "" --config.train.steps="$TEACHER_STEPS" ;;
    ode) train ode ",ode" --config.train.steps="$ODE_STEPS" \
      --config.train.teacher_path="$RUN/teacher/export" --config.train.init_from="$RUN/teacher/export" ;;
    dmd_window | dmd_sink | dmd_ema_sink | dmd_full) dmd "${stage#dmd_}" "$RUN/ode/export" ;;
    dmd_adastate) dmd adastate "$RUN/dmd_window/export" --config.train.init_policy=window ;;
    eval)
      python - "$RUN" <<'PY'
import json, os, sys
run = sys.argv[1]
arms = [a for a in ("window", "sink", "ema_sink", "full", "adastate") if os.path.exists(f"{run}/dmd_{a}/export/info.json")]
spec = {"checkpoints": [{"arm": a, "path": f"dmd_{a}/export", "train_seed": 0} for a in arms]}
with open(f"{run}/models.json", "w") as fh:
    json.dump(spec, fh, indent=1)
print(f"[models] {run}/models.json: {arms}")
PY
      # shellcheck disable=SC2086
      python launch/evaluate.py --config="$CFG,dmd" --checkpoints="$RUN/models.json" \
        --horizon_chunks=7 --horizons=1,2,6 --clips_per_label=1 --seeds=0,1 --out_dir="$RUN/eval" ${EVAL_FLAGS:-} ;;
    ship) python launch/ship_models.py --from="$RUN" ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
