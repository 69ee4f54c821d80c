#!/usr/bin/env bash
# The compiles behind the README's "TPU pods" table, one at a time (libtpu serves one process).
# Run from the repository root with libtpu importable, e.g.
#   PYTHONPATH=$PWD:<dir with libtpu> bash assets/tpu_compile/run_all.sh [GROUP...]
# Each group writes assets/tpu_compile/<group>.json (after every stage) and <group>.log.
set -u
cd "$(dirname "$0")/../.."
OUT=assets/tpu_compile
export JAX_PLATFORMS=cpu

run() {  # run GROUP ARGS...
  local group=$1; shift
  echo "=== $group: python launch/compile_tpu.py $* --json=$OUT/$group.json" | tee "$OUT/$group.log"
  python launch/compile_tpu.py "$@" --json="$OUT/$group.json" >>"$OUT/$group.log" 2>&1
  echo "=== $group: exit $?" | tee -a "$OUT/$group.log"
}

group() {
  case $1 in
    # v5p_128.json was written by a run with --stages=teacher,ode,dmd:adastate; its DMD compile
    # did not finish (v5p_128.log stops during it): the DMD stages are their own group
    v5p_128) run v5p_128 --config=configs/wan_1_3b_tpu.py:v5p-128 --topologies=v5p:4x4x4 --stages=teacher,ode ;;
    v5p_128_dmd) run v5p_128_dmd --config=configs/wan_1_3b_tpu.py:v5p-128 --topologies=v5p:4x4x4 --stages=dmd:adastate,dmd:sink ;;
    v5e_256) run v5e_256 --config=configs/wan_1_3b_tpu.py:v5e-256 --topologies=v5e:16x16 --stages=teacher,ode,dmd:adastate ;;
    # ODE on the fly does not fit v5e-256 (the teacher's trajectory in the step); stored trajectories
    v5e_256_ode_stored) run v5e_256_ode_stored --config=configs/wan_1_3b_tpu.py:v5e-256 --topologies=v5e:16x16 --stages=ode --config.data.source=ode_trajectories --config.data.paths=data/wan_ode_trajectories ;;
    v5p_64) run v5p_64 --config=configs/wan_1_3b_tpu.py:v5p-64 --topologies=v5p:2x4x4 --stages=teacher,ode,dmd:adastate ;;
    teacher14b) run teacher14b --config=configs/wan_1_3b_tpu.py:v5p-128,teacher14b --topologies=v5p:4x4x4 --stages=dmd:adastate ;;
    stream_1_3b) run stream_1_3b --config=configs/wan_1_3b_tpu.py:v5e-8 --topologies=v5e:2x4,v6e:2x4 --stages=step:adastate,segment:adastate ;;
    # what might make 1.3B streaming fit v5e-8: a bf16 Wan-VAE decoder (does not), no decoder in the step
    stream_1_3b_v5e_bf16vae) run stream_1_3b_v5e_bf16vae --config=configs/wan_1_3b_tpu.py:v5e-8 --topologies=v5e:2x4 --stages=step:adastate --config.vae.wan.dtype=bfloat16 ;;
    stream_1_3b_v5e_novae) run stream_1_3b_v5e_novae --config=configs/wan_1_3b_tpu.py:v5e-8 --topologies=v5e:2x4 --stages=step:adastate --config.vae.kind=none ;;
    stream_14b_v5e_novae) run stream_14b_v5e_novae --config=configs/wan_14b_tpu.py:v5e-8 --topologies=v5e:2x4 --stages=step:adastate --config.vae.kind=none ;;
    stream_14b) run stream_14b --config=configs/wan_14b_tpu.py:v5e-8 --topologies=v5e:2x4,v6e:2x4 --stages=step:adastate,segment:adastate ;;
    *) echo "unknown group $1"; return 2 ;;
  esac
}

for g in "${@:-v5p_128 v5p_128_dmd teacher14b v5p_64 v5e_256 v5e_256_ode_stored stream_1_3b stream_14b stream_1_3b_v5e_bf16vae stream_1_3b_v5e_novae stream_14b_v5e_novae}"; do
  for one in $g; do group "$one"; done
done
