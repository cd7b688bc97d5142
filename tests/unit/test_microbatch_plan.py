"""The micro-batch planner (algo/batches.py) and the loss_type counts it asks algo/loss.py for, against
hand-computed cases: no model, no tokenizer."""

from __future__ import annotations

import pytest

from grpokit.algo.batches import plan_micro_batches
from grpokit.algo.loss import LOSS_TYPES, describe, step_totals

LENGTHS = [3, 1, 4, 1, 5, 9, 2, 6]  # tokens of each completion of an 8-row generation
STOPPED = ["stop"] * 8


def _rows(planned) -> list[tuple[int, int]]:
    return [(p.rows.start, p.rows.stop) for p in planned]


def _counts(planned) -> list[tuple[int, int]]:
    return [(p.totals.num_sequences, p.totals.num_tokens) for p in planned]


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_one_process_two_windows_of_two_micro_batches(loss_type):
    planned = plan_micro_batches(LENGTHS, STOPPED, batch_size=2, accumulation=2, loss_type=loss_type,
                                 mask_truncated=False)
    assert _rows(planned) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    # window rows 0-3: 3 + 1 + 4 + 1 tokens; rows 4-7: 5 + 9 + 2 + 6
    assert _counts(planned) == [(4, 9), (4, 9), (4, 22), (4, 22)]
    assert planned[0].totals is planned[1].totals  # one normaliser per optimizer step


def test_one_window_of_the_whole_generation():
    planned = plan_micro_batches(LENGTHS, STOPPED, batch_size=4, accumulation=2, loss_type="dapo",
                                 mask_truncated=False)
    assert _rows(planned) == [(0, 4), (4, 8)]
    assert _counts(planned) == [(8, 31), (8, 31)]


@pytest.mark.parametrize(("index", "rows"), [(0, [(0, 2), (4, 6)]), (1, [(2, 4), (6, 8)])])
def test_each_process_trains_on_its_part_of_each_window(index, rows):
    # a window is 2 rows x 1 micro-batch x 2 processes = 4 rows: process 0 the first 2, process 1 the next 2
    dapo = plan_micro_batches(LENGTHS, STOPPED, batch_size=2, accumulation=1, loss_type="dapo", mask_truncated=False,
                              process_index=index, process_count=2)
    assert _rows(dapo) == rows
    assert _counts(dapo) == [(4, 9), (4, 22)]  # dapo: the window's tokens over every process


@pytest.mark.parametrize(("index", "tokens"), [(0, [(3 + 1) * 2, (5 + 9) * 2]), (1, [(4 + 1) * 2, (2 + 6) * 2])])
def test_bnpo_counts_this_process_tokens_times_the_processes(index, tokens):
    bnpo = plan_micro_batches(LENGTHS, STOPPED, batch_size=2, accumulation=1, loss_type="bnpo", mask_truncated=False,
                              process_index=index, process_count=2)
    assert [p.totals.num_tokens for p in bnpo] == tokens  # x 2 undoes DDP's mean over processes
    assert [p.totals.num_sequences for p in bnpo] == [4, 4]


def test_bnpo_equals_dapo_on_one_process():
    bnpo = plan_micro_batches(LENGTHS, STOPPED, batch_size=2, accumulation=2, loss_type="bnpo", mask_truncated=False)
    dapo = plan_micro_batches(LENGTHS, STOPPED, batch_size=2, accumulation=2, loss_type="dapo", mask_truncated=False)
    assert _counts(bnpo) == _counts(dapo) == [(4, 9), (4, 9), (4, 22), (4, 22)]


def test_mask_truncated_completions_counts_no_tokens_of_rows_cut_off():
    reasons = ["stop", "length", "stop", "length", "stop", "stop", "length", "stop"]
    masked = plan_micro_batches(LENGTHS, reasons, batch_size=2, accumulation=2, loss_type="dapo", mask_truncated=True)
    assert _counts(masked) == [(4, 3 + 4), (4, 3 + 4), (4, 5 + 9 + 6), (4, 5 + 9 + 6)]  # cut-off rows still count
    kept = plan_micro_batches(LENGTHS, reasons, batch_size=2, accumulation=2, loss_type="dapo", mask_truncated=False)
    assert _counts(kept) == [(4, 9), (4, 9), (4, 22), (4, 22)]


def test_mask_truncated_with_bnpo_on_two_processes():
    reasons = ["length", "stop", "stop", "stop", "stop", "length", "stop", "stop"]
    planned = plan_micro_batches(LENGTHS, reasons, batch_size=2, accumulation=1, loss_type="bnpo",
                                 mask_truncated=True, process_index=0, process_count=2)
    assert [p.totals.num_tokens for p in planned] == [1 * 2, 5 * 2]


def test_step_totals_and_the_rule_table_agree():
    assert set(LOSS_TYPES) == {"grpo", "bnpo", "dapo", "dr_grpo"}
    assert [t for t, r in LOSS_TYPES.items() if r.process_tokens] == ["bnpo"]
    totals = step_totals("bnpo", [3, 1, 4, 1], [3, 1], 2)
    assert (totals.num_sequences, totals.num_tokens) == (4, 8)
    totals = step_totals("dr_grpo", [3, 1, 4, 1], [3, 1], 2)
    assert (totals.num_sequences, totals.num_tokens) == (4, 9)
    with pytest.raises(ValueError, match="unknown loss_type 'nope'"):
        step_totals("nope", [1], [1], 1)


def test_describe_fills_in_the_run_numbers():
    text = describe("dr_grpo", step_sequences=16, process_sequences=8, max_completion_length=50)
    assert text == "the sum over tokens / (16 completions x max_completion_length 50) = 800, a constant"
    assert "this process's 8 completions" in describe("bnpo", step_sequences=16, process_sequences=8,
                                                      max_completion_length=50)
