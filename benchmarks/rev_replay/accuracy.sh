#!/bin/bash
# Issue 15: the quickstart recipe (preset quick: rev r=1, lr 5e-3, B=128, T=48, eps=8) shortened to 1000
# training examples (3 epochs, ~23 steps) and 300 evaluation examples, old vs new rev, seeds 0 and 1.
# Usage: rev_accuracy.sh OLD_TREE NEW_TREE OUT_DIR
OLD=$1; NEW=$2; OUT=$3
for seed in 0 1; do
  for tag in new old; do
    tree=$OLD; [ $tag = new ] && tree=$NEW
    ( cd $tree && PYTHONPATH=$tree OMP_NUM_THREADS=1 /usr/bin/time -f "%U user s" dpmemarc train --method rev \
        --max-train 1000 --max-eval 300 --seed $seed --no-progress --output $OUT/$tag-seed$seed ) \
        > $OUT/$tag-seed$seed.log 2>&1
    echo "$tag seed $seed done: $(tail -3 $OUT/$tag-seed$seed.log | tr '\n' ' ')"
  done
done
