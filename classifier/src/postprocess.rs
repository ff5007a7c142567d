//! Logits to results: softmax, top-k, labels (with marine classes' scientific names) and the
//! marine group.

use reefline_schemas::Prediction;

use reefline_common::labels::Labels;
use reefline_common::models::Outputs;

/// Numerically stable softmax.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|&x| (x - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

/// Indices of the `k` largest values, largest first; ties keep the lower index first.
pub fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// The top-`k` labelled predictions for one image's outputs (logits, or probabilities as they are).
pub fn predictions(outputs: &[f32], kind: Outputs, labels: &Labels, k: usize) -> Vec<Prediction> {
    let probs = match kind {
        Outputs::Logits => softmax(outputs),
        Outputs::Probabilities => outputs.to_vec(),
    };
    top_k(&probs, k)
        .into_iter()
        .map(|i| {
            let class = labels.get(i);
            Prediction {
                index: i as i32,
                wnid: class.map(|c| c.wnid.clone()).unwrap_or_default(),
                label: class.map(|c| c.label.clone()).unwrap_or_default(),
                scientific_name: class.and_then(|c| c.scientific_name.clone()),
                score: probs[i],
            }
        })
        .collect()
}

/// The marine group of the top class (shark, ray, bony fish, ...), if it is a marine animal.
pub fn marine_group(predictions: &[Prediction], labels: &Labels) -> Option<String> {
    let top = predictions.first()?;
    labels.get(top.index as usize)?.marine_group.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let p = softmax(&[1.0, 2.0, 3.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((p[2] - 0.665_241_1).abs() < 1e-6);
        assert!(p[0] < p[1] && p[1] < p[2]);
    }

    #[test]
    fn softmax_survives_huge_logits() {
        let p = softmax(&[1000.0, 1000.0]);
        assert_eq!(p, vec![0.5, 0.5]);
    }

    #[test]
    fn top_k_is_sorted_and_stable() {
        assert_eq!(top_k(&[0.1, 0.5, 0.2, 0.5, 0.0], 3), vec![1, 3, 2]);
        assert_eq!(top_k(&[0.3], 5), vec![0]);
    }

    #[test]
    fn predictions_are_labelled() {
        let text: String = (0..1000).map(|i| format!("{i}\tn{i:08}\tclass {i}\n")).collect();
        let marine = "2\tshark\tgreat white shark\tCarcharodon carcharias\n";
        let labels = Labels::parse(&text, marine, &[[0, 397]]).unwrap();
        let mut logits = vec![0.0; 1000];
        logits[2] = 20.0;
        logits[7] = 5.0;
        let p = predictions(&logits, Outputs::Logits, &labels, 5);
        assert_eq!(p.len(), 5);
        assert_eq!((p[0].index, p[0].label.as_str(), p[0].wnid.as_str()), (2, "class 2", "n00000002"));
        assert_eq!(p[0].scientific_name.as_deref(), Some("Carcharodon carcharias"));
        assert_eq!(marine_group(&p, &labels).as_deref(), Some("shark"));
        assert_eq!(p[1].index, 7);
        assert!(p[0].score > 0.99);
    }

    #[test]
    fn probabilities_are_scores_as_they_are() {
        let labels = Labels::parse("0\ta\tcat\n1\tb\tdog\n2\tc\tfish\n", "", &[]).unwrap();
        let p = predictions(&[0.2, 0.7, 0.1], Outputs::Probabilities, &labels, 2);
        let got: Vec<(&str, f32)> = p.iter().map(|p| (p.label.as_str(), p.score)).collect();
        assert_eq!(got, [("dog", 0.7), ("cat", 0.2)]);
        assert_eq!(marine_group(&p, &labels), None);
    }
}
