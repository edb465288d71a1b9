//! `spool-engine-bench`: the worker's engine path for `minilm-embed` (decode the JSON
//! inputs, tokenize, batch, forward, encode each output to JSON, and build the JSON of the
//! statement that stores a batch's results) at several batch sizes, with no RabbitMQ or
//! PostgreSQL. `scripts/bench/engine` runs it beside PyTorch's own forward of the same
//! artifact on the same sentences (`scripts/bench/engine_baseline.py`, fed by
//! `--dump-inputs`).
//!
//! Batches run through the worker's own runtime (`ModelHandle`) as its consumer runs them,
//! with its default two batches in flight: each batch is prepared (decoded, tokenized) and
//! finished (outputs as JSON) on blocking threads, and its statement JSON built, while the
//! other batch's forward runs on the model thread. Throughput is sentences over wall time.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use spool_shared::breaker::BreakerSettings;
use spool_shared::config::WorkerSettings;
use spool_shared::manifest::{EngineKind, ModelSpec};
use spool_shared::telemetry;
use spool_worker::device;
use spool_worker::engine::ItemResult;
use spool_worker::runtime::ModelHandle;
use spool_worker::store::{self, Completion, Outcome};
use tokio::task::JoinSet;
use uuid::Uuid;

const USAGE: &str = "\
usage: spool-engine-bench --artifact MODEL.pt --tokenizer tokenizer.json [options]
  --device auto|cpu|cuda   where the model runs (default auto)
  --tokens short|long      sentence lengths: ~10-40 tokens (mean ~20) or ~128 (default short)
  --batches 1,8,32         batch sizes (default CUDA 1,2,4,...,256; CPU 1,8,32,64)
  --seconds S              time each batch size for at least S seconds (default CUDA 1, CPU 0.5)
  --iters N                time exactly N batches per size instead
  --warmup N               untimed batches per size first (default CUDA 10, CPU 2)
  --cpu-threads N          libtorch's threads per forward, as worker.cpu_threads (default: its default)
  --dump-inputs FILE       write the sentences as JSON lines ({\"text\": ...}); batch B uses the first B
  --json FILE              write the figures as JSON";

const CUDA_BATCHES: [usize; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 256];
/// Two cores here: larger batches or longer runs would take minutes.
const CPU_BATCHES: [usize; 4] = [1, 8, 32, 64];
/// Timing a few batches even when one batch outlasts `--seconds` keeps the mean honest.
const MIN_TIMED_BATCHES: usize = 3;

/// Common words that are one WordPiece each, plus a few that split, as real text does.
const WORDS: [&str; 64] = [
    "the",
    "a",
    "job",
    "model",
    "user",
    "queue",
    "batch",
    "server",
    "request",
    "result",
    "time",
    "data",
    "system",
    "worker",
    "report",
    "team",
    "price",
    "order",
    "city",
    "market",
    "game",
    "school",
    "water",
    "light",
    "music",
    "before",
    "after",
    "because",
    "while",
    "during",
    "with",
    "without",
    "into",
    "over",
    "under",
    "between",
    "every",
    "runs",
    "waits",
    "sends",
    "reads",
    "writes",
    "fails",
    "returns",
    "starts",
    "stops",
    "quickly",
    "slowly",
    "again",
    "never",
    "often",
    "large",
    "small",
    "new",
    "old",
    "last",
    "first",
    "asynchronously",
    "throughput",
    "inference",
    "embeddings",
    "latency",
    "tokenizer",
    "deduplicated",
];

#[derive(Clone, Copy)]
enum Lengths {
    /// Words per sentence 7–37, skewed short like real sentences: ~10–40 tokens, mean ~20.
    Short,
    /// 88–117 words: ~110–150 tokens, mean ~128.
    Long,
}

struct Args {
    artifact: PathBuf,
    tokenizer: PathBuf,
    device: String,
    lengths: Lengths,
    batches: Option<Vec<usize>>,
    seconds: Option<f64>,
    iters: Option<usize>,
    warmup: Option<usize>,
    cpu_threads: usize,
    dump_inputs: Option<PathBuf>,
    json: Option<PathBuf>,
}

/// One batch size's figures.
struct Measurement {
    batch: usize,
    iters: usize,
    /// From the first timed batch to the last batch's statement JSON.
    wall: Duration,
    /// The model thread's time in the forwards (tensors, forward, copy back).
    infer: Duration,
    /// The batch tasks' time building the statements' JSON.
    write: Duration,
    output_bytes: usize,
    mean_tokens: f64,
    padded_tokens: usize,
    gpu_used_mib: Option<f64>,
}

impl Measurement {
    fn sentences_per_second(&self) -> f64 {
        (self.batch * self.iters) as f64 / self.wall.as_secs_f64()
    }

    fn per_batch_ms(&self, total: Duration) -> f64 {
        total.as_secs_f64() * 1e3 / self.iters as f64
    }

    fn to_json(&self) -> Value {
        json!({
            "batch": self.batch,
            "iters": self.iters,
            "sentences_per_s": self.sentences_per_second(),
            "ms_per_batch": self.per_batch_ms(self.wall),
            "infer_ms": self.per_batch_ms(self.infer),
            "write_ms": self.per_batch_ms(self.write),
            "output_bytes_per_sentence": self.output_bytes / self.batch,
            "mean_tokens": self.mean_tokens,
            "padded_tokens": self.padded_tokens,
            "gpu_used_mib": self.gpu_used_mib,
        })
    }
}

fn main() -> anyhow::Result<()> {
    telemetry::init("warn");
    tokio::runtime::Runtime::new()?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let args = parse_args(std::env::args().skip(1))?;
    let device = device::select(&args.device)?;
    // As the worker does (`Application::build`): it is the engine path as deployed.
    tch::set_num_threads(args.cpu_threads.clamp(1, 256) as i32);
    let on_cuda = device.is_cuda();
    let batches =
        args.batches.clone().unwrap_or_else(|| if on_cuda { CUDA_BATCHES.to_vec() } else { CPU_BATCHES.to_vec() });
    let seconds = args.seconds.unwrap_or(if on_cuda { 1.0 } else { 0.5 });
    let warmup = args.warmup.unwrap_or(if on_cuda { 10 } else { 2 });
    let largest = batches.iter().copied().max().context("--batches is empty")?;
    let sentences = sentences(args.lengths, largest);
    if let Some(path) = &args.dump_inputs {
        let lines: String = sentences.iter().map(|s| format!("{s}\n")).collect();
        std::fs::write(path, lines).with_context(|| format!("writing {}", path.display()))?;
    }

    let spec = minilm_spec(&args);
    let started = Instant::now();
    let model = ModelHandle::start(spec.clone(), device, BreakerSettings::default(), batches_in_flight()).await?;
    println!(
        "engine: minilm-embed on {device:?} ({} CPU threads), artifact {}, loaded in {:.1} s",
        args.cpu_threads,
        spec.artifact.display(),
        started.elapsed().as_secs_f64()
    );

    let mut measurements = Vec::with_capacity(batches.len());
    for &batch in &batches {
        let inputs = &sentences[..batch];
        let mut measurement = measure(&model, inputs, warmup, args.iters, seconds).await?;
        if on_cuda {
            measurement.gpu_used_mib = gpu_memory_used_mib();
        }
        let gpu = measurement.gpu_used_mib.map(|mib| format!(", GPU used {mib:.0} MiB")).unwrap_or_default();
        println!(
            "batch {batch:>4}: {:>9.1} sentences/s, {:>8.3} ms/batch (model thread {:.3}, statement JSON {:.3}), tokens mean {:.1} padded {}{gpu}",
            measurement.sentences_per_second(),
            measurement.per_batch_ms(measurement.wall),
            measurement.per_batch_ms(measurement.infer),
            measurement.per_batch_ms(measurement.write),
            measurement.mean_tokens,
            measurement.padded_tokens,
        );
        measurements.push(measurement);
    }

    if let Some(path) = &args.json {
        let report = json!({
            "side": "engine",
            "device": if on_cuda { "cuda" } else { "cpu" },
            "artifact": spec.artifact,
            "tokens": match args.lengths { Lengths::Short => "short", Lengths::Long => "long" },
            "cpu_threads": args.cpu_threads,
            "gpu_memory": "device memory in use (cudaMemGetInfo total - free) after the size's runs: \
                           CUDA context plus libtorch's caching allocator",
            "results": measurements.iter().map(Measurement::to_json).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Warms up, then runs batches as the worker's consumer does with its default two batches
/// in flight: two tasks, each preparing a batch, waiting for its forward on the model
/// thread, finishing it, and building its statement JSON, while the other's runs.
async fn measure(
    model: &ModelHandle,
    inputs: &[Value],
    warmup: usize,
    iters: Option<usize>,
    seconds: f64,
) -> anyhow::Result<Measurement> {
    let (mut token_counts, mut output_bytes) = (Vec::new(), 0);
    // At least one: the token counts come from it.
    for _ in 0..warmup.max(1) {
        let output = model.infer(inputs.to_vec()).await?;
        (token_counts, output_bytes) = inspect(&output.results)?;
        std::hint::black_box(store::results_json(&completions(output.results)?));
    }
    let budget = Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let launched = Arc::new(AtomicUsize::new(0));
    let inputs = Arc::new(inputs.to_vec());
    let mut tasks = JoinSet::new();
    for _ in 0..batches_in_flight() {
        let (model, inputs, launched) = (model.clone(), Arc::clone(&inputs), Arc::clone(&launched));
        tasks.spawn(async move {
            let (mut infer, mut write, mut done) = (Duration::ZERO, Duration::ZERO, 0);
            loop {
                let n = launched.fetch_add(1, Ordering::Relaxed);
                let more = match iters {
                    Some(max) => n < max,
                    None => n < MIN_TIMED_BATCHES || started.elapsed() < budget,
                };
                if !more {
                    break;
                }
                let output = model.infer(inputs.to_vec()).await?;
                infer += output.inference_time.unwrap_or_default();
                let began = Instant::now();
                std::hint::black_box(store::results_json(&completions(output.results)?));
                write += began.elapsed();
                done += 1;
            }
            anyhow::Ok((infer, write, done))
        });
    }
    let (mut infer, mut write, mut done) = (Duration::ZERO, Duration::ZERO, 0);
    while let Some(task) = tasks.join_next().await {
        let (task_infer, task_write, task_done) = task??;
        (infer, write, done) = (infer + task_infer, write + task_write, done + task_done);
    }
    Ok(Measurement {
        batch: inputs.len(),
        iters: done,
        wall: started.elapsed(),
        infer,
        write,
        output_bytes,
        mean_tokens: token_counts.iter().sum::<usize>() as f64 / token_counts.len().max(1) as f64,
        padded_tokens: token_counts.iter().copied().max().unwrap_or(0),
        gpu_used_mib: None,
    })
}

/// The worker's default `worker.batches_in_flight`: the bench runs batches as it does.
fn batches_in_flight() -> usize {
    WorkerSettings::default().batches_in_flight.max(1)
}

/// The results as the consumer hands them to `store::complete`: every input must succeed.
fn completions(results: Vec<ItemResult>) -> anyhow::Result<Vec<Completion>> {
    results
        .into_iter()
        .map(|result| {
            let output = result.map_err(|e| anyhow::anyhow!("an input failed: {}: {}", e.code, e.message))?;
            Ok(Completion { id: Uuid::now_v7(), attempt: 1, outcome: Outcome::Succeeded(output), trace_id: None })
        })
        .collect()
}

/// Each output's token count, and the JSON bytes of all the outputs.
fn inspect(results: &[ItemResult]) -> anyhow::Result<(Vec<usize>, usize)> {
    let mut token_counts = Vec::with_capacity(results.len());
    let mut bytes = 0;
    for result in results {
        let output = result.as_ref().map_err(|e| anyhow::anyhow!("an input failed: {}: {}", e.code, e.message))?;
        bytes += output.get().len();
        let parsed: Value = serde_json::from_str(output.get())?;
        token_counts.push(parsed["tokens"].as_u64().context("output without a token count")? as usize);
    }
    Ok((token_counts, bytes))
}

/// The manifest's `minilm-embed` entry with the artifact and tokenizer given on the command line.
fn minilm_spec(args: &Args) -> ModelSpec {
    ModelSpec {
        name: "minilm-embed".into(),
        task: "embedding".into(),
        engine: EngineKind::Minilm,
        artifact: args.artifact.clone(),
        tokenizer: Some(args.tokenizer.clone()),
        max_batch_size: CUDA_BATCHES[CUDA_BATCHES.len() - 1],
        max_batch_delay_ms: 0,
        max_tokens: Some(256),
        max_attempts: None,
        input_schema: Value::Null,
        output_schema: Value::Null,
        description: String::new(),
    }
}

/// Deterministic sentences (a fixed seed), so every run and the Python baseline see the same text.
fn sentences(lengths: Lengths, count: usize) -> Vec<Value> {
    let mut random = SplitMix64(0x5b00_1e4e);
    (0..count)
        .map(|_| {
            let words = match lengths {
                Lengths::Short => 7 + (31.0 * random.unit() * random.unit()) as usize,
                Lengths::Long => 88 + (30.0 * random.unit()) as usize,
            };
            let mut text = String::new();
            for i in 0..words {
                let word = WORDS[random.below(WORDS.len())];
                if i == 0 {
                    let mut chars = word.chars();
                    text.extend(chars.next().map(|c| c.to_ascii_uppercase()));
                    text.push_str(chars.as_str());
                } else {
                    text.push(' ');
                    text.push_str(word);
                }
            }
            text.push('.');
            json!({ "text": text })
        })
        .collect()
}

/// splitmix64: tiny, and its sequence never changes with a crate upgrade.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Device memory in use, as `nvidia-smi` would show it, from the CUDA runtime libtorch
/// already loaded: tch exposes no allocator statistics. `None` when the runtime library
/// cannot be found.
#[allow(unsafe_code)]
fn gpu_memory_used_mib() -> Option<f64> {
    type MemGetInfo = unsafe extern "C" fn(free: *mut usize, total: *mut usize) -> i32;
    for lib in ["libcudart.so.13", "libcudart.so.12", "libcudart.so"] {
        let name = std::ffi::CString::new(lib).expect("static library name. This is a bug.");
        // SAFETY: RTLD_NOLOAD only returns a library that is already loaded (by libtorch_cuda).
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
        if handle.is_null() {
            continue;
        }
        let symbol = c"cudaMemGetInfo";
        // SAFETY: a valid handle and C string; the symbol has this signature in every CUDA runtime.
        let function = unsafe { libc::dlsym(handle, symbol.as_ptr()) };
        if function.is_null() {
            continue;
        }
        // SAFETY: the symbol is cudaMemGetInfo(size_t*, size_t*) -> cudaError_t.
        let mem_get_info: MemGetInfo = unsafe { std::mem::transmute::<*mut libc::c_void, MemGetInfo>(function) };
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: both pointers are valid for writes; CUDA is initialized by the runs before.
        if unsafe { mem_get_info(&mut free, &mut total) } == 0 {
            return Some((total - free) as f64 / (1 << 20) as f64);
        }
    }
    None
}

fn parse_args(mut args: impl Iterator<Item = String>) -> anyhow::Result<Args> {
    let (mut artifact, mut tokenizer) = (None, None);
    let mut parsed = Args {
        artifact: PathBuf::new(),
        tokenizer: PathBuf::new(),
        device: "auto".into(),
        lengths: Lengths::Short,
        batches: None,
        seconds: None,
        iters: None,
        warmup: None,
        cpu_threads: WorkerSettings::default().cpu_threads,
        dump_inputs: None,
        json: None,
    };
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = args.next().with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        let number = |what: &str| format!("{flag}: {what:?} is not a number");
        match flag.as_str() {
            "--artifact" => artifact = Some(PathBuf::from(value)),
            "--tokenizer" => tokenizer = Some(PathBuf::from(value)),
            "--device" => parsed.device = value,
            "--tokens" => {
                parsed.lengths = match value.as_str() {
                    "short" => Lengths::Short,
                    "long" => Lengths::Long,
                    other => bail!("--tokens: expected short or long, got {other:?}"),
                }
            }
            "--batches" => {
                let sizes = value
                    .split(',')
                    .map(|s| s.trim().parse::<usize>().ok().filter(|&n| n > 0).with_context(|| number(s)))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                parsed.batches = Some(sizes);
            }
            "--seconds" => parsed.seconds = Some(value.parse().with_context(|| number(&value))?),
            "--iters" => parsed.iters = Some(value.parse().with_context(|| number(&value))?),
            "--warmup" => parsed.warmup = Some(value.parse().with_context(|| number(&value))?),
            "--cpu-threads" => parsed.cpu_threads = value.parse().with_context(|| number(&value))?,
            "--dump-inputs" => parsed.dump_inputs = Some(PathBuf::from(value)),
            "--json" => parsed.json = Some(PathBuf::from(value)),
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if !matches!(parsed.device.as_str(), "auto" | "cpu" | "cuda") {
        bail!("--device: expected auto, cpu or cuda, got {:?}", parsed.device);
    }
    parsed.artifact = artifact.with_context(|| format!("--artifact is required\n{USAGE}"))?;
    parsed.tokenizer = tokenizer.with_context(|| format!("--tokenizer is required\n{USAGE}"))?;
    Ok(parsed)
}
