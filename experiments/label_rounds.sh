#!/usr/bin/env bash
# Label some rounds of the reaction job on a second machine, and pack what it made.
#
#   bash experiments/label_rounds.sh ROUNDS SECONDS WORKERS OUT.tar [make_dataset.py options]
#
# In a copy of this checkout (same code, same cache, and `pip install -e '.[data]'` in it: the
# script refuses to run a phljax installed from elsewhere), runs `make_dataset.py --rounds ROUNDS
# --workers WORKERS` with one thread per worker, asks it to stop (STOP file) after SECONDS, and
# writes OUT.tar with the cache files it made (refreshed every 45 s, so a run killed from outside
# still leaves what it finished) and its log as OUT.log. Merge them on the first machine, whose
# job can go on meanwhile as long as it labels other rounds:
#
#   tar xf OUT.tar --skip-old-files -C data/dft_cache/reactions
#   cp OUT.log data/dft_cache/reactions/log.<machine>-<date>.txt
#   python experiments/make_dataset.py --assemble
set -u
rounds=$1 seconds=$2 workers=$3 out=$(realpath -m "$4")
shift 4
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
# make_dataset.py labels with the installed phljax, which must be this checkout's code (imported
# from experiments/, as the script is, so that the working directory does not decide)
pkg=$(cd "$root/experiments" && "$python" -c 'import os, phljax; print(os.path.dirname(os.path.dirname(os.path.realpath(phljax.__file__))))') || exit 1
if [ "$pkg" != "$(cd "$root" && pwd -P)" ]; then
  echo "label_rounds.sh: phljax is imported from $pkg, not from this checkout ($root); pip install -e '.[data]' here" >&2
  exit 2
fi
cache=$root/data/dft_cache/reactions
for arg in "$@"; do
  [ "${prev:-}" = --cache ] && cache=$(realpath -m "$arg")
  case $arg in --cache=*) cache=$(realpath -m "${arg#--cache=}") ;; esac
  prev=$arg
done
mkdir -p "$(dirname "$out")" "$cache"
rm -f "$cache/STOP"
start=$(mktemp) && sleep 1  # files newer than this are the run's
pack() {  # the run's data files, not the per-run top-level files (config, summary, reaction copies)
  (cd "$cache" && find . -mindepth 2 -newer "$start" -type f \( -name '*.npz' -o -name '*.json' \) ! -name '*.tmp' |
    tar cf "$out.part" -T - && mv "$out.part" "$out")
}
(while sleep 45; do pack; done) >/dev/null 2>&1 &
packer=$!
disown $packer
(sleep "$seconds" && touch "$cache/STOP") >/dev/null 2>&1 &
stopper=$!
disown $stopper
# its own process group, so that afterwards exactly this job's workers can be ended
OMP_NUM_THREADS=$workers setsid timeout -k 10 $((seconds + 300)) "$python" "$root/experiments/make_dataset.py" \
  --no-progress --workers "$workers" --rounds "$rounds" --out "$(mktemp -d)" "$@" > "${out%.tar}.log" 2>&1 &
job=$!
wait $job
rc=$?
kill -9 -- -$job $packer $stopper 2>/dev/null
pack
rm -f "$cache/STOP" "$start"
echo "make_dataset.py exited with $rc; $(tar tf "$out" | wc -l) files in $out, $(grep -ac ' labelled ' "${out%.tar}.log") labels logged"
exit $rc
