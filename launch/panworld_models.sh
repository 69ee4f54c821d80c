#!/usr/bin/env bash
# The shipped PanWorld models (checkpoints/panworld/), stage by stage, on the recipe of
# configs/panworld.py (README "Training"): the diffusion-forcing teacher -> its teacher-forcing
# fine-tune (teacher_tf, the teacher the students learn from) -> its ODE trajectories, solved chunk
# by chunk as it streams, stored once (traj) -> ODE init on them (a window student) ->
# self-forcing DMD (teacher and critic scoring in teacher-forcing mode) of the window / sink /
# ema_sink / full students from the ODE init -> the adastate student from the window student (the
# paper's path) -> evaluation of all of them -> ship.
#
#   bash launch/panworld_models.sh RUN_DIR [STAGE ...]     # run (or resume) everything, or some stages
#   STAGES: teacher teacher_tf traj ode dmd_window dmd_sink dmd_ema_sink dmd_full dmd_adastate eval ship
#
# Re-running skips every stage whose export exists (launch/train.py resumes a killed stage from its
# checkpoints; traj skips finished shards). Steps per stage: TEACHER_STEPS, TF_STEPS, TRAJ_CLIPS,
# ODE_STEPS, DMD_STEPS (every DMD student), ADASTATE_STEPS (the adastate student's, on top of the
# window student's DMD_STEPS: 120, the shipped one's: it beat 60 on progression, return and flicker, README "Try it");
# EVAL_FLAGS adds launch/evaluate.py flags. Run from the repository root; RUN_DIR is best relative.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:?usage: bash launch/panworld_models.sh RUN_DIR [STAGE ...]}
shift
STAGES=("$@")
[ ${#STAGES[@]} -gt 0 ] || STAGES=(teacher teacher_tf traj ode dmd_window dmd_sink dmd_ema_sink dmd_full dmd_adastate eval ship)
CFG=configs/panworld.py
TEACHER_STEPS=${TEACHER_STEPS:-2500}
TF_STEPS=${TF_STEPS:-1000}
TRAJ_CLIPS=${TRAJ_CLIPS:-768}
ODE_STEPS=${ODE_STEPS:-500}
DMD_STEPS=${DMD_STEPS:-60}
ADASTATE_STEPS=${ADASTATE_STEPS:-120}
TEACHER=$RUN/teacher_tf/export  # the students' teacher
mkdir -p "$RUN"

train() {  # train NAME CONFIG_ARG FLAGS...: launch/train.py into RUN/NAME unless RUN/NAME/export exists
  local name=$1 arg=$2; shift 2
  if [ -f "$RUN/$name/export/info.json" ]; then echo "[models] $name: done ($RUN/$name/export)"; return; fi
  local cmd=(python launch/train.py --config="$CFG:$arg" "$@" --workdir="$RUN/$name")
  echo "[models] $name: ${cmd[*]}"
  mkdir -p "$RUN/$name" && echo "${cmd[*]}" > "$RUN/$name/command.txt"
  "${cmd[@]}"
}

dmd() {  # dmd POLICY INIT_DIR STEPS [FLAGS...]
  local policy=$1 init=$2 steps=$3; shift 3
  train "dmd_$policy" "dmd,$policy" --config.train.steps="$steps" --config.train.teacher_path="$TEACHER" \
    --config.train.teacher_attention=teacher_forcing --config.train.init_from="$init" "$@"
}

for stage in "${STAGES[@]}"; do
  case $stage in
    teacher) train teacher teacher --config.train.steps="$TEACHER_STEPS" ;;
    teacher_tf) train teacher_tf teacher_tf --config.train.steps="$TF_STEPS" --config.train.init_from="$RUN/teacher/export" ;;
    traj) python launch/make_ode_trajectories.py --config="$CFG:ode" --config.train.teacher_path="$TEACHER" \
      --out_dir="$RUN/ode_trajectories" --num_clips="$TRAJ_CLIPS" --clips_per_file=128 ;;
    ode) train ode ode,stored --config.data.paths="('$RUN/ode_trajectories',)" --config.train.steps="$ODE_STEPS" \
      --config.train.init_from="$TEACHER" ;;
    dmd_window | dmd_sink | dmd_ema_sink | dmd_full) dmd "${stage#dmd_}" "$RUN/ode/export" "$DMD_STEPS" ;;
    # state_loss=none: the shipped adastate student was trained before the study made 'regress' the default
    dmd_adastate) dmd adastate "$RUN/dmd_window/export" "$ADASTATE_STEPS" --config.train.init_policy=window \
      --config.train.state_loss=none ;;
    eval)
      python - "$RUN" <<'PY'
import json, os, sys
run = sys.argv[1]
arms = [a for a in ("window", "sink", "ema_sink", "full", "adastate") if os.path.exists(f"{run}/dmd_{a}/export/info.json")]
spec = {"checkpoints": [{"arm": a, "path": f"dmd_{a}/export", "train_seed": 0} for a in arms]}
if "ema_sink" not in arms and "sink" in arms:
    # configs/panworld.py trains on 9-frame clips (3 chunks): nothing is evicted, so an ema_sink
    # student trains bit for bit as the sink student does (README "Training"): stream that one
    spec["checkpoints"].append({"arm": "ema_sink", "path": "dmd_sink/export", "train_seed": 0})
    arms.append("ema_sink (the sink student)")
with open(f"{run}/models.json", "w") as fh:
    json.dump(spec, fh, indent=1)
print(f"[models] {run}/models.json: {arms}")
PY
      # shellcheck disable=SC2086
      python launch/evaluate.py --config="$CFG:dmd" --checkpoints="$RUN/models.json" \
        --horizon_chunks=7 --horizons=1,2,6 --seeds=0,1,2 --out_dir="$RUN/eval" ${EVAL_FLAGS:-} ;;
    ship) python launch/ship_models.py --from="$RUN" ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
