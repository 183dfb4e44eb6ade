"""Random initialisation of the BLIP-2 modules, scaled to each layer's width.

transformers initialises every BLIP-2 weight matrix from N(0, 0.02), BERT's choice for width 768.
The Q-Former is a post-LayerNorm transformer: each sub-layer's output is added to its input and
the sum is normalised. At width 64 a 0.02 matrix shrinks a unit-variance input about eight-fold
(0.02 * sqrt(64) = 0.16), two in a row about fifty-fold, so every attention and feed-forward
branch adds ~2% to a residual stream that the embeddings fill: the text's [CLS] output is then
the same vector for every input (cosine 1.00000 between different queries, measured), and
training leaves that start late and by seed luck. Drawing each weight matrix from
N(0, 1 / fan_in) keeps a unit-variance input at unit variance at any width, so the branches
matter from step 0 (docs/model.md gives the measurements).

Embedding tables (token and position embeddings, the learned query tokens, the ViT's class and
position embeddings) keep N(0, 0.02): a LayerNorm follows each of them, so their scale does not
change the forward pass, and 0.02 is the ViT and BERT convention. Biases start at zero and norms
at identity (transformers' own init). Pretrained weights never pass through here.
"""

from __future__ import annotations

from torch import nn
from transformers import Blip2ForImageTextRetrieval

EMBEDDING_STD = 0.02


def init_random_weights(blip: Blip2ForImageTextRetrieval) -> None:
    """Re-draw every linear and convolution weight from N(0, 1 / fan_in) and the query tokens
    from N(0, 0.02) (transformers zero-initialises them: identical queries would get identical
    gradients and never differentiate)."""
    for module in blip.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            fan_in = module.weight[0].numel()
            nn.init.normal_(module.weight, std=fan_in**-0.5)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    nn.init.normal_(blip.query_tokens, std=EMBEDDING_STD)
