//! All parameters in one flat `f32` buffer, gradients in a twin buffer of the same
//! layout, and named views into both. Names are the published state_dict names
//! (`text_model.*`, `object_model.*`, `txt_proj.1.*`), so checkpoints map one to one.

use crate::backend::{Backend, Cpu};
use std::collections::HashMap;

/// Index of one named tensor inside [`Params`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ParamId(pub usize);

#[derive(Clone, Debug)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
    /// False for tensors present in checkpoints but unused by the forward pass
    /// (`norm3` of each video block, the final video `norm`): they get no gradient
    /// and AdamW leaves them unchanged.
    pub receives_grad: bool,
}

/// Collects tensor declarations, then allocates the buffers once.
#[derive(Default)]
pub struct ParamsBuilder {
    specs: Vec<ParamSpec>,
    total: usize,
}

impl ParamsBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Declare a tensor that the forward pass uses.
    pub fn add(&mut self, name: impl Into<String>, shape: &[usize]) -> ParamId {
        self.push(name.into(), shape, true)
    }

    /// Declare a tensor kept only so checkpoints round-trip (no gradient, never updated).
    pub fn add_unused(&mut self, name: impl Into<String>, shape: &[usize]) -> ParamId {
        self.push(name.into(), shape, false)
    }

    fn push(&mut self, name: String, shape: &[usize], receives_grad: bool) -> ParamId {
        assert!(!self.specs.iter().any(|s| s.name == name), "parameter {name} declared twice");
        let len = shape.iter().product();
        let id = ParamId(self.specs.len());
        self.specs.push(ParamSpec { name, shape: shape.to_vec(), offset: self.total, len, receives_grad });
        self.total += len;
        id
    }

    pub fn build(self) -> Params {
        self.build_on(&Cpu)
    }

    /// The buffers (zeros) on a backend.
    pub fn build_on<B: Backend>(self, be: &B) -> Params<B> {
        let index = self.specs.iter().enumerate().map(|(i, s)| (s.name.clone(), ParamId(i))).collect();
        Params { data: be.zeros(self.total), grad: be.zeros(self.total), specs: self.specs, index }
    }
}

/// The flat parameter and gradient buffers (of the backend `B`) with their named views.
#[derive(Clone, Debug)]
pub struct Params<B: Backend = Cpu> {
    pub data: B::Buf,
    pub grad: B::Buf,
    specs: Vec<ParamSpec>,
    index: HashMap<String, ParamId>,
}

impl<B: Backend> Params<B> {
    pub fn specs(&self) -> &[ParamSpec] {
        &self.specs
    }

    pub fn spec(&self, id: ParamId) -> &ParamSpec {
        &self.specs[id.0]
    }

    pub fn id(&self, name: &str) -> Option<ParamId> {
        self.index.get(name).copied()
    }

    pub fn len(&self) -> usize {
        B::buf_len(&self.data)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where a tensor lies in the buffers.
    pub fn range(&self, id: ParamId) -> std::ops::Range<usize> {
        let s = &self.specs[id.0];
        s.offset..s.offset + s.len
    }

    /// The same tensors and values on another backend `to` (copied through the host).
    pub fn to_backend<C: Backend>(&self, from: &B, to: &C) -> Params<C> {
        let copy = |buf: &B::Buf| {
            let host = from.to_host(B::view(buf));
            let mut out = C::Buf::default();
            to.write_host(&mut out, host.len(), |d| d.copy_from_slice(&host));
            out
        };
        Params { data: copy(&self.data), grad: copy(&self.grad), specs: self.specs.clone(), index: self.index.clone() }
    }

    /// Per-element flag: does this element receive gradient / get updated?
    pub fn update_mask(&self) -> Vec<bool> {
        let mut m = vec![false; self.len()];
        for s in &self.specs {
            if s.receives_grad {
                m[s.offset..s.offset + s.len].iter_mut().for_each(|x| *x = true);
            }
        }
        m
    }
}

impl Params<Cpu> {
    pub fn get(&self, id: ParamId) -> &[f32] {
        let s = &self.specs[id.0];
        &self.data[s.offset..s.offset + s.len]
    }

    pub fn get_mut(&mut self, id: ParamId) -> &mut [f32] {
        let s = &self.specs[id.0];
        &mut self.data[s.offset..s.offset + s.len]
    }

    pub fn grad(&self, id: ParamId) -> &[f32] {
        let s = &self.specs[id.0];
        &self.grad[s.offset..s.offset + s.len]
    }

    pub fn grad_mut(&mut self, id: ParamId) -> &mut [f32] {
        let s = &self.specs[id.0];
        &mut self.grad[s.offset..s.offset + s.len]
    }

    /// A tensor's values (read) and its gradient (write) at once: the common need of a backward pass.
    pub fn value_and_grad_mut(&mut self, id: ParamId) -> (&[f32], &mut [f32]) {
        let s = &self.specs[id.0];
        (&self.data[s.offset..s.offset + s.len], &mut self.grad[s.offset..s.offset + s.len])
    }

    pub fn zero_grad(&mut self) {
        self.grad.iter_mut().for_each(|g| *g = 0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_are_disjoint_and_named() {
        let mut b = ParamsBuilder::new();
        let w = b.add("a.weight", &[2, 3]);
        let n = b.add_unused("a.norm3.weight", &[4]);
        let mut p = b.build();
        assert_eq!(p.len(), 10);
        p.get_mut(w).copy_from_slice(&[1., 2., 3., 4., 5., 6.]);
        p.get_mut(n).copy_from_slice(&[7., 8., 9., 10.]);
        assert_eq!(p.data, vec![1., 2., 3., 4., 5., 6., 7., 8., 9., 10.]);
        assert_eq!(p.id("a.norm3.weight"), Some(n));
        assert_eq!(p.update_mask().iter().filter(|&&x| x).count(), 6);
        let (v, g) = p.value_and_grad_mut(w);
        g[0] = v[5];
        assert_eq!(p.grad[0], 6.0);
    }
}
