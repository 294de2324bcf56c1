# Sourced by scripts/bench/*-tables.sh (which set $out and $jobs first).
# run NAME CMD...: runs CMD, logging to $out/NAME.log and timing it into $out/NAME/time.txt; skips a
# run that already finished (time.txt), so an interrupted script can be started again. Exported,
# so `xargs -P … bash -c` can call it.
run() {
  local name=$1; shift
  if [[ -s $out/$name/time.txt ]]; then return 0; fi
  local t0=$SECONDS
  "$@" >"$out/$name.log" 2>&1 || { echo "FAILED: $name (see $out/$name.log)" >&2; tail -3 "$out/$name.log" >&2; return 1; }
  mkdir -p "$out/$name"
  echo "wall_seconds=$((SECONDS - t0)) jobs_in_parallel=$jobs command=$*" >"$out/$name/time.txt"
}
export -f run
export out jobs
