//! The limits a request's work is held to, whichever way it came in: each front door checks
//! what it parsed (naming parameters as its clients write them), and a node checks what a
//! peer forwarded to it the same way.

use flatmesh_runtime::{GenerateRequest, SamplingParams, MAX_CHOICES, MAX_TOP_LOGPROBS};

use super::{error::ServeError, request::Work, MAX_INPUTS};

/// Most stop sequences one request may give (as OpenAI allows).
pub const MAX_STOP: usize = 4;

/// How a front door names a parameter (`temperature`, `parameters.temperature`).
pub type Name<'a> = &'a dyn Fn(&str) -> String;

/// Parameters named as they are in the serve path's own types.
pub fn plain(name: &str) -> String {
    name.to_string()
}

/// Every sampling number in its range (a NaN is in none).
pub fn sampling(s: &SamplingParams, name: Name<'_>) -> Result<(), ServeError> {
    let t = s.temperature;
    if !(0.0..=2.0).contains(&t) {
        let m = format!("{t} is not between 0 and 2");
        return Err(ServeError::bad_request(name("temperature"), m));
    }
    let p = s.top_p;
    if !(p > 0.0 && p <= 1.0) {
        let m = format!("{p} is not in (0, 1]");
        return Err(ServeError::bad_request(name("top_p"), m));
    }
    for (key, v) in [
        ("presence_penalty", s.presence_penalty),
        ("frequency_penalty", s.frequency_penalty),
    ] {
        if !(-2.0..=2.0).contains(&v) {
            let m = format!("{v} is not between -2 and 2");
            return Err(ServeError::bad_request(name(key), m));
        }
    }
    Ok(())
}

/// A generation's sampling, length and stop sequences.
pub fn generate(g: &GenerateRequest, name: Name<'_>) -> Result<(), ServeError> {
    sampling(&g.sampling, name)?;
    if g.max_tokens == Some(0) {
        return Err(ServeError::bad_request(
            name("max_tokens"),
            "must be at least 1",
        ));
    }
    if !(1..=MAX_CHOICES).contains(&g.n) {
        let m = format!("{} is not between 1 and {MAX_CHOICES}", g.n);
        return Err(ServeError::bad_request(name("n"), m));
    }
    if let Some(k) = g.logprobs.filter(|&k| k > MAX_TOP_LOGPROBS) {
        let m = format!("{k} is more than {MAX_TOP_LOGPROBS}");
        return Err(ServeError::bad_request(name("top_logprobs"), m));
    }
    if g.stop.len() > MAX_STOP {
        return Err(ServeError::bad_request(
            name("stop"),
            format!("at most {MAX_STOP} stop sequences are allowed"),
        ));
    }
    Ok(())
}

/// How many texts one request may embed.
pub fn inputs(n: usize, name: &str) -> Result<(), ServeError> {
    if n > MAX_INPUTS {
        return Err(ServeError::bad_request(
            name,
            format!("at most {MAX_INPUTS} inputs per request, got {n}"),
        ));
    }
    Ok(())
}

/// The whole work, with the serve path's own names.
pub fn work(w: &Work) -> Result<(), ServeError> {
    match w {
        Work::Generate(g) => generate(g, &plain),
        Work::Embed { inputs: texts, .. } => inputs(texts.len(), "inputs"),
        Work::Infer { texts, generate: g } => {
            inputs(texts.len(), "texts")?;
            generate(g, &plain)
        }
    }
}

#[cfg(test)]
mod tests {
    use flatmesh_runtime::Prompt;

    use super::*;

    fn gen(f: impl FnOnce(&mut GenerateRequest)) -> Work {
        let mut g = GenerateRequest {
            prompt: Prompt::Text("hi".into()),
            max_tokens: Some(4),
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            n: 1,
            logprobs: None,
        };
        f(&mut g);
        Work::Generate(g)
    }

    fn refused(w: Work) -> String {
        work(&w).expect_err("refused").param.unwrap_or_default()
    }

    #[test]
    fn sampling_out_of_range_or_not_finite_is_refused_by_name() {
        assert!(work(&gen(|_| {})).is_ok());
        assert_eq!(
            refused(gen(|g| g.sampling.temperature = 99.0)),
            "temperature"
        );
        assert_eq!(
            refused(gen(|g| g.sampling.temperature = f32::NAN)),
            "temperature"
        );
        assert_eq!(refused(gen(|g| g.sampling.top_p = 7.0)), "top_p");
        assert_eq!(refused(gen(|g| g.sampling.top_p = 0.0)), "top_p");
        assert_eq!(refused(gen(|g| g.sampling.top_p = f32::NAN)), "top_p");
        let p = refused(gen(|g| g.sampling.presence_penalty = -1e30));
        assert_eq!(p, "presence_penalty");
        let p = refused(gen(|g| g.sampling.frequency_penalty = f32::INFINITY));
        assert_eq!(p, "frequency_penalty");
        assert_eq!(refused(gen(|g| g.max_tokens = Some(0))), "max_tokens");
        assert_eq!(refused(gen(|g| g.stop = vec!["x".into(); 5])), "stop");
    }

    #[test]
    fn at_most_max_inputs_texts_are_embedded() {
        let embed = |n| Work::Embed {
            inputs: vec!["x".to_string(); n],
            dimensions: None,
        };
        assert!(work(&embed(MAX_INPUTS)).is_ok());
        let e = work(&embed(3000)).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("inputs"));
        assert!(e.message.contains("at most 2048"), "{}", e.message);
    }

    #[test]
    fn front_doors_name_parameters_their_way() {
        let g = GenerateRequest {
            prompt: Prompt::Text("hi".into()),
            max_tokens: None,
            sampling: SamplingParams {
                temperature: 3.0,
                ..Default::default()
            },
            stop: Vec::new(),
            n: 1,
            logprobs: None,
        };
        let e = generate(&g, &|k| format!("parameters.{k}")).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("parameters.temperature"));
        assert_eq!(
            e.message,
            "parameters.temperature: 3 is not between 0 and 2"
        );
    }
}
