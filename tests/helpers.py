"""Test helpers: prompt logits through our paged attention, and pool accounting."""

from __future__ import annotations

import torch

from kvtrove.layers.attention import AttentionMetadata


@torch.inference_mode()
def prompt_logits(llm, token_ids: list[int]) -> torch.Tensor:
    """[T, V] logits of every prompt position from our model (one fresh prefill into slots 0..T-1).

    Only valid on an idle engine: the slots are overwritten.
    """
    eng = llm.engine
    assert not eng.has_unfinished()
    T = len(token_ids)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(T),
        num_decodes=0,
        decode_slots=None,
        decode_lens=None,
        decode_mask=None,
        prefills=[eng.runner.prefill_seq(0, 0, T, torch.arange(T))],
    )
    hidden = eng.model(torch.tensor(token_ids), torch.arange(T), meta)
    eng.pool.reset_cache()  # the slots written above may belong to cached blocks
    return eng.model.compute_logits(hidden)


def run_until_done(eng) -> dict:
    """Step an engine until nothing is left; the final output of each request, by request id."""
    done = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    return done


def assert_all_blocks_free(llm) -> None:
    eng = llm.engine
    assert not eng.has_unfinished()
    assert eng.pool.num_free_blocks == eng.pool.num_blocks, (
        f"{eng.pool.num_blocks - eng.pool.num_free_blocks} KV blocks still held"
    )
    assert all(b.ref_cnt == 0 for b in eng.pool.blocks)


def drop_stream_early(client, model: str, after: int = 3) -> None:
    """Start a long streaming chat answer and leave after `after` chunks (a client going away)."""
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Tell me a very long story about a dragon."}],
        max_tokens=400,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for i, _ in enumerate(stream):
        if i == after:
            break
    stream.close()
