"""Prompting-decoder invariants, and both decoders against naive spatial-order implementations."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from milan.masking import MaskIndices, gather_tokens, random_masking, restore_order
from milan.models.decoder import MAEDecoder, PromptingDecoder

GRID, IN_DIM, OUT_DIM = (4, 4), 48, 20


def _inputs(batch: int = 3, ratio: float = 0.75) -> tuple[torch.Tensor, MaskIndices]:
    mask = random_masking(torch.rand(batch, GRID[0] * GRID[1], generator=torch.Generator().manual_seed(3)), ratio)
    latent = torch.randn(batch, 1 + mask.num_keep, IN_DIM)
    return latent, mask


def _decoder() -> PromptingDecoder:
    dec = PromptingDecoder(GRID, in_dim=IN_DIM, out_dim=OUT_DIM, embed_dim=32, depth=3, num_heads=4)
    with torch.no_grad():
        for p in dec.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return dec


def naive_prompting_decoder(dec: PromptingDecoder, latent: torch.Tensor, mask: MaskIndices) -> torch.Tensor:
    """The reference algorithm as written in the paper/mmpretrain: unshuffle to spatial order in every block."""
    b = latent.shape[0]
    z = dec.decoder_embed(latent)
    n_mask = mask.ids_shuffle.shape[1] - mask.num_keep
    seq = torch.cat([z[:, 1:], dec.mask_token.expand(b, n_mask, -1)], dim=1)
    seq = gather_tokens(seq, mask.ids_restore)  # spatial order
    full = torch.cat([z[:, :1], seq], dim=1) + dec.decoder_pos_embed
    prompts = torch.cat([full[:, :1], gather_tokens(full[:, 1:], mask.ids_keep)], dim=1)
    tokens = gather_tokens(full[:, 1:], mask.ids_mask)
    for blk in dec.decoder_blocks:
        h = blk.norm1(tokens)
        kvs = torch.cat([prompts[:, :1], gather_tokens(torch.cat([prompts[:, 1:], h], 1), mask.ids_restore)], 1)
        heads, hd = blk.attn.num_heads, blk.attn.head_dim
        q = blk.attn.q(h).view(b, -1, heads, hd).transpose(1, 2)
        k, v = blk.attn.kv(kvs).view(b, -1, 2, heads, hd).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) * hd**-0.5, dim=-1)
        out = blk.attn.proj((attn @ v).transpose(1, 2).reshape(b, -1, heads * hd))
        tokens = tokens + out
        tokens = tokens + blk.mlp(blk.norm2(tokens))
    out = torch.cat([prompts[:, :1], gather_tokens(torch.cat([prompts[:, 1:], tokens], 1), mask.ids_restore)], 1)
    return dec.decoder_pred(dec.decoder_norm(out))


def test_prompting_decoder_matches_naive_spatial_order_algorithm() -> None:
    dec = _decoder()
    latent, mask = _inputs()
    with torch.no_grad():
        expected = naive_prompting_decoder(dec, latent, mask)
        mask_order = dec(latent, mask)
        spatial = restore_order(mask_order, mask)
    assert spatial.shape == (3, 17, OUT_DIM)
    torch.testing.assert_close(spatial, expected, atol=1e-5, rtol=1e-5)
    # Mask order is [cls, visible in ids_keep order, masked in ids_mask order].
    torch.testing.assert_close(mask_order[:, 1:], gather_tokens(spatial[:, 1:], mask.ids_shuffle))
    torch.testing.assert_close(mask_order[:, 0], spatial[:, 0])


def test_prompts_come_out_unchanged() -> None:
    dec = _decoder()
    latent, mask = _inputs()
    with torch.no_grad():
        out = restore_order(dec(latent, mask), mask)
        pos = dec.decoder_pos_embed.expand(latent.shape[0], -1, -1)
        z = dec.decoder_embed(latent)
        prompts = torch.cat([z[:, :1] + pos[:, :1], z[:, 1:] + gather_tokens(pos[:, 1:], mask.ids_keep)], 1)
        direct = dec.decoder_pred(dec.decoder_norm(prompts))  # no block touched them
    torch.testing.assert_close(out[:, 0], direct[:, 0])
    torch.testing.assert_close(gather_tokens(out[:, 1:], mask.ids_keep), direct[:, 1:])


def test_changing_a_mask_token_input_leaves_prompt_outputs_unchanged() -> None:
    dec = _decoder()
    latent, mask = _inputs()
    with torch.no_grad():
        prompts, tokens = dec._embed(latent, mask)
        base = torch.cat([prompts, _run_blocks(dec, tokens, prompts)], dim=1)
        tokens2 = tokens.clone()
        tokens2[:, 0] += 1.0  # change one mask token's input
        changed = torch.cat([prompts, _run_blocks(dec, tokens2, prompts)], dim=1)
        # And through the public forward: a different mask token leaves every visible/cls prediction unchanged.
        before = dec(latent, mask)
        dec.mask_token.add_(0.5)
        after = dec(latent, mask)
    k = 1 + mask.num_keep
    torch.testing.assert_close(changed[:, :k], base[:, :k], rtol=0, atol=0)
    assert not torch.allclose(changed[:, k:], base[:, k:])
    torch.testing.assert_close(after[:, :k], before[:, :k], rtol=0, atol=0)
    assert not torch.allclose(after[:, k:], before[:, k:])


def _run_blocks(dec: PromptingDecoder, tokens: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    for blk in dec.decoder_blocks:
        tokens = blk(tokens, prompts)
    return tokens


def test_visible_tokens_inform_the_masked_predictions() -> None:
    dec = _decoder()
    latent, mask = _inputs()
    with torch.no_grad():
        before = dec(latent, mask)
        latent2 = latent.clone()
        latent2[:, 1] += 1.0
        after = dec(latent2, mask)
    k = 1 + mask.num_keep
    assert not torch.allclose(after[:, k:], before[:, k:])  # masked queries attend over the prompts
    torch.testing.assert_close(after[:, 0], before[:, 0])  # other prompts are independent
    torch.testing.assert_close(after[:, 2:k], before[:, 2:k])


def test_mae_decoder_matches_naive_spatial_order_algorithm() -> None:
    dec = MAEDecoder(GRID, in_dim=IN_DIM, out_dim=OUT_DIM, embed_dim=32, depth=2, num_heads=4)
    latent, mask = _inputs()
    with torch.no_grad():
        b = latent.shape[0]
        z = dec.decoder_embed(latent)
        n_mask = mask.ids_shuffle.shape[1] - mask.num_keep
        seq = gather_tokens(torch.cat([z[:, 1:], dec.mask_token.expand(b, n_mask, -1)], 1), mask.ids_restore)
        x = torch.cat([z[:, :1], seq], dim=1) + dec.decoder_pos_embed
        for blk in dec.decoder_blocks:
            x = blk(x)
        expected = dec.decoder_pred(dec.decoder_norm(x))
        got = restore_order(dec(latent, mask), mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_prompt_attention_equals_explicit_softmax() -> None:
    dec = _decoder()
    attn = dec.decoder_blocks[0].attn
    q_in, kv_in = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    with torch.no_grad():
        got = attn(q_in, kv_in)
        q = attn.q(q_in).view(2, 5, 4, 8).transpose(1, 2)
        k, v = attn.kv(kv_in).view(2, 9, 2, 4, 8).permute(2, 0, 3, 1, 4)
        expected = attn.proj((F.softmax(q @ k.transpose(-2, -1) / 8**0.5, -1) @ v).transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
