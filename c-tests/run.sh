#!/bin/sh
# Runs the C test programs given as arguments, adds up their
# "RESULT <name> <passed> <failed>" lines and prints "N passed, N failed"
# last. A program that dies or exits non-zero without a RESULT line counts
# as one failure. Exit status 1 if anything failed.
passed=0
failed=0
for prog in "$@"; do
    out=$("$prog" 2>&1)
    status=$?
    printf '%s\n' "$out" | grep -v '^RESULT '
    result=$(printf '%s\n' "$out" | grep '^RESULT ' | tail -1)
    if [ -n "$result" ]; then
        read -r _ name p f <<EOR
$result
EOR
        echo "-- $name: $p passed, $f failed (exit $status)"
        passed=$((passed + p))
        failed=$((failed + f))
        if [ "$f" -eq 0 ] && [ "$status" -ne 0 ]; then
            failed=$((failed + 1))
        fi
    else
        echo "-- $prog: no result (exit $status)"
        failed=$((failed + 1))
    fi
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
