//! The forward pass's operations on the GPU: `Backend` and `StepBackend` for `Cuda`, each a
//! launch of this module's kernels on the copy's stream.

use super::*;

impl Backend for Cuda {
    fn begin(&mut self, tokens: usize) {
        self.tokens = tokens;
    }

    fn embed(&mut self, model: &Model, ids: &[u32]) {
        let x = self.sized(Buf::X, model.shape.dim);
        let ids: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        let p = self.upload_meta(0, &ids);
        let args = [
            Arg::P(self.weight(&model.embed)),
            Arg::I(model.shape.dim as i32),
            Arg::P(p),
            Arg::P(x),
        ];
        let name = format!("embed_{}", suffix(model.embed.qtype));
        self.run(&name, Launch::per_row(ids.len()), &args);
    }

    fn rms_norm(&mut self, from: Buf, weight: &[f32], eps: f32, to: Buf) {
        let w = self.vector(weight);
        let out = self.sized(to, weight.len());
        let args = [
            Arg::P(self.buf(from)),
            Arg::P(0),
            Arg::I(weight.len() as i32),
            Arg::P(w),
            Arg::F(eps),
            Arg::P(out),
        ];
        self.run("rms_norm", Launch::per_row(self.tokens), &args);
    }

    fn matmul(&mut self, _model: &Model, from: Buf, outs: &[(&Matrix, Buf)]) {
        let input = self.buf(from);
        for (w, to) in outs {
            let out = self.sized(*to, w.rows);
            self.matvec(w, input, self.tokens, out);
        }
    }

    fn add_bias(&mut self, to: Buf, bias: &[f32]) {
        let b = self.vector(bias);
        let n = self.tokens * bias.len();
        let args = [
            Arg::P(self.buf(to)),
            Arg::P(b),
            Arg::I(bias.len() as i32),
            Arg::I(n as i32),
        ];
        self.run("add_bias", Launch::elementwise(n), &args);
    }

    fn rope(&mut self, buf: Buf, head_dim: usize, base: f32, positions: &[usize]) {
        let pos: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
        let p = self.upload_meta(1, &pos);
        let width = self.widths[buf as usize];
        let args = [
            Arg::P(self.buf(buf)),
            Arg::I(width as i32),
            Arg::I(head_dim as i32),
            Arg::F(base.powf(-2.0 / head_dim as f32)),
            Arg::P(p),
        ];
        self.run("rope", Launch::per_row(self.tokens), &args);
    }

    fn attention(&mut self, model: &Model, layer: usize, batch: &Batch) {
        let s = &model.shape;
        let max_blocks = batch
            .tables
            .iter()
            .map(|t| t.blocks.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let mut flat = vec![0i32; batch.tables.len() * max_blocks];
        for (row, t) in flat.chunks_mut(max_blocks).zip(&batch.tables) {
            for (o, b) in row.iter_mut().zip(&t.blocks) {
                *o = *b as i32;
            }
        }
        let pos: Vec<i32> = batch.positions.iter().map(|&p| p as i32).collect();
        let seq: Vec<i32> = batch.seq_of.iter().map(|&p| p as i32).collect();
        let (pp, sp, tp) = (
            self.upload_meta(1, &pos),
            self.upload_meta(2, &seq),
            self.upload_meta(3, &flat),
        );
        let common = |k: &Self| {
            [pp, sp, tp].map(Arg::P).into_iter().chain([
                Arg::I(max_blocks as i32),
                Arg::I(k.layers as i32),
                Arg::I(layer as i32),
                Arg::I(k.block_tokens as i32),
            ])
        };
        let mut args = vec![
            Arg::P(self.buf(Buf::K)),
            Arg::P(self.buf(Buf::V)),
            Arg::I(s.kv_dim() as i32),
        ];
        args.extend(common(self));
        args.push(Arg::P(self.kv.1));
        self.run("kv_store", Launch::per_row(self.tokens), &args);
        let ctx = pos.iter().max().map_or(1, |&p| p as usize + 1);
        let scores = grow(
            &self.mem,
            &self.held,
            &mut self.scores,
            self.tokens * s.heads * ctx * 4,
            &mut self.error,
        );
        let out = self.sized(Buf::Att, s.q_dim());
        let mut args = vec![Arg::P(self.buf(Buf::Q)), Arg::P(self.kv.1)];
        args.extend(common(self));
        args.extend([
            Arg::I(s.heads as i32),
            Arg::I(s.kv_heads as i32),
            Arg::I(s.head_dim as i32),
            Arg::F(1.0 / (s.head_dim as f32).sqrt()),
            Arg::P(scores),
            Arg::I(ctx as i32),
            Arg::P(out),
        ]);
        self.run("attention", Launch::attention(s.heads, self.tokens), &args);
    }

    fn silu_mul(&mut self) {
        let n = self.tokens * self.widths[Buf::Gate as usize];
        let args = [
            Arg::P(self.buf(Buf::Gate)),
            Arg::P(self.buf(Buf::Up)),
            Arg::I(n as i32),
        ];
        self.run("silu_mul", Launch::elementwise(n), &args);
    }

    fn add(&mut self, to: Buf, from: Buf) {
        let n = self.widths[to as usize] * self.tokens;
        let args = [
            Arg::P(self.buf(to)),
            Arg::P(self.buf(from)),
            Arg::I(n as i32),
        ];
        self.run("add", Launch::elementwise(n), &args);
    }

    fn logits(&mut self, model: &Model, rows: &[usize]) -> &[f32] {
        self.logits.clear();
        if rows.is_empty() {
            return &self.logits;
        }
        let n = rows.len() * model.output.rows;
        self.head(model, rows);
        let mut bytes = vec![0u8; n * 4];
        if self.error.is_none() {
            let stream = self.mem.0.clone();
            let copied = match &self.out.mem {
                Some(m) => stream.memcpy_dtoh(&m.block.slice(0..n * 4), &mut bytes[..]),
                None => Ok(()),
            };
            if let Err(e) = copied.and_then(|_| stream.synchronize()) {
                self.fail(e);
            }
        }
        self.logits.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]])),
        );
        &self.logits
    }

    fn samples(&self) -> bool {
        true
    }

    fn sample(&mut self, model: &Model, rows: &[usize], how: &[DeviceSampling]) -> Vec<u32> {
        if rows.is_empty() {
            return Vec::new();
        }
        let out = self.head(model, rows);
        let cat = |f: &dyn Fn(&DeviceSampling) -> [u8; 4]| -> Vec<u8> {
            how.iter().flat_map(f).collect()
        };
        let t = self.upload(2, &cat(&|h| h.temperature.to_ne_bytes()));
        let k = self.upload(
            3,
            &cat(&|h| (h.top_k.min(i32::MAX as u32) as i32).to_ne_bytes()),
        );
        let p = self.upload(4, &cat(&|h| h.top_p.to_ne_bytes()));
        let seeds: Vec<u8> = how.iter().flat_map(|h| h.seed.to_ne_bytes()).collect();
        let sd = self.upload(5, &seeds);
        let st = self.upload(6, &cat(&|h| h.step.to_ne_bytes()));
        let o = grow(
            &self.mem,
            &self.held,
            &mut self.meta[7],
            rows.len() * 4,
            &mut self.error,
        );
        let args = [
            Arg::P(out),
            Arg::I(model.shape.vocab as i32),
            Arg::P(t),
            Arg::P(k),
            Arg::P(p),
            Arg::P(sd),
            Arg::P(st),
            Arg::P(o),
        ];
        self.run("sample", Launch::per_row(rows.len()), &args);
        let mut bytes = vec![0u8; rows.len() * 4];
        if self.error.is_none() {
            let stream = self.mem.0.clone();
            let copied = match &self.meta[7].mem {
                Some(m) => stream.memcpy_dtoh(&m.block.slice(0..bytes.len()), &mut bytes[..]),
                None => Ok(()),
            };
            if let Err(e) = copied.and_then(|_| stream.synchronize()) {
                self.fail(e);
            }
        }
        bytes
            .chunks_exact(4)
            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]).max(0) as u32)
            .collect()
    }

    fn copy_blocks(&mut self, copies: &[(u32, u32)]) {
        let (base, len) = (self.kv.1, self.kv_block_bytes as u64);
        for &(from, to) in copies {
            if self.error.is_some() {
                return;
            }
            // SAFETY: both blocks are inside the KV allocation (block ids come from the pool
            // it was sized for) and distinct (a copy goes to a newly taken block).
            let copied = unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    base + to as u64 * len,
                    base + from as u64 * len,
                    len as usize,
                    self.mem.0.cu_stream(),
                )
            };
            if let Err(e) = copied {
                self.fail(e);
            }
        }
    }

    fn take_error(&mut self) -> Option<String> {
        self.error.take().map(|e| e.to_string())
    }
}

impl Cuda {
    /// The final norm and the output head over the given rows of `X`; the logits' address.
    fn head(&mut self, model: &Model, rows: &[usize]) -> u64 {
        let d = model.shape.dim;
        let idx: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
        let ip = self.upload_meta(0, &idx);
        let w = self.vector(&model.norm);
        let (m, h, e) = (&self.mem, &self.held, &mut self.error);
        let norm = grow(m, h, &mut self.norm, rows.len() * d * 4, e);
        let args = [
            Arg::P(self.buf(Buf::X)),
            Arg::P(ip),
            Arg::I(d as i32),
            Arg::P(w),
            Arg::F(model.shape.eps),
            Arg::P(norm),
        ];
        self.run("rms_norm", Launch::per_row(rows.len()), &args);
        let n = rows.len() * model.output.rows;
        let out = grow(&self.mem, &self.held, &mut self.out, n * 4, &mut self.error);
        self.matvec(&model.output, norm, rows.len(), out);
        out
    }
}

impl StepBackend for Cuda {
    fn kv(&mut self) -> &mut KvPool {
        &mut self.pool
    }
}
