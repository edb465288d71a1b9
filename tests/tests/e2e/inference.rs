//! Real models, real results: outputs checked against references made with PyTorch.

use std::time::Duration;

use serde_json::json;
use spool_tests::{AppOptions, as_f64s, cosine, model_file, spawn_app_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digits_predictions_match_the_held_out_labels() {
    let app = spawn_app_with(AppOptions { worker_models: vec!["digits-cnn"], ..Default::default() }).await;
    let heldout = model_file("digits-cnn/heldout.json");
    let samples: Vec<_> = heldout["samples"].as_array().unwrap().iter().take(40).cloned().collect();

    let mut ids = Vec::new();
    for sample in &samples {
        ids.push(app.submit("digits-cnn", json!({"pixels": sample["pixels"]})).await);
    }
    let mut correct = 0;
    for (id, sample) in ids.iter().zip(&samples) {
        let job = app.wait_finished(id, Duration::from_secs(30)).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        let output = &job["output"];
        // Same artifact, same input: the prediction is exactly PyTorch's.
        assert_eq!(output["label"], sample["predicted"], "{job}");
        let probabilities = as_f64s(&output["probabilities"]);
        assert_eq!(probabilities.len(), 10);
        assert!((probabilities.iter().sum::<f64>() - 1.0).abs() < 1e-4);
        if output["label"] == sample["label"] {
            correct += 1;
        }
        assert!(job["batch_size"].as_i64().unwrap() >= 1);
        assert!(job["inference_ms"].as_f64().unwrap() > 0.0);
        assert!(job["queue_ms"].as_f64().unwrap() >= 0.0);
        assert_eq!(job["attempts"], 1);
    }
    assert!(correct as f64 / samples.len() as f64 >= 0.9, "only {correct}/{} correct", samples.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minilm_embeddings_match_sentence_transformers() {
    let app = spawn_app_with(AppOptions { worker_models: vec!["minilm-embed"], ..Default::default() }).await;
    let reference = model_file("minilm-embed/reference.json");
    let sentences = reference["sentences"].as_array().unwrap();

    let mut ids = Vec::new();
    for sentence in sentences {
        ids.push(app.submit("minilm-embed", json!({"text": sentence["text"]})).await);
    }
    let mut embeddings = std::collections::HashMap::new();
    for (id, sentence) in ids.iter().zip(sentences) {
        let job = app.wait_finished(id, Duration::from_secs(60)).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        let embedding = as_f64s(&job["output"]["embedding"]);
        assert_eq!(embedding.len(), 384);
        let norm = embedding.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "not normalized: {norm}");
        let expected = as_f64s(&sentence["embedding"]);
        let similarity = cosine(&embedding, &expected);
        assert!(similarity >= 0.999, "{}: cosine {similarity}", sentence["text"]);
        assert_eq!(job["output"]["tokens"], sentence["tokens"], "{}", sentence["text"]);
        embeddings.insert(sentence["text"].as_str().unwrap().to_owned(), embedding);
    }
    let cat = &embeddings["a cat sits on the mat"];
    let kitten = &embeddings["a kitten rests on a rug"];
    let stocks = &embeddings["stock markets fell sharply"];
    assert!(cosine(cat, kitten) > cosine(cat, stocks) + 0.2, "semantic ranking is off");
}
