//! Parameters: named tensors in checkpoint order, each trainable or frozen.

pub mod lora;

use crate::{Error, Result, Tensor};
use std::collections::HashMap;

/// One named parameter.
#[derive(Clone, Debug)]
pub struct Param {
    /// The checkpoint key (Hugging Face name).
    pub name: String,
    pub tensor: Tensor,
    /// Frozen parameters are never watched by the tape, so they get no gradient buffer.
    pub trainable: bool,
}

/// Parameters in a fixed order, looked up by name.
#[derive(Clone, Debug, Default)]
pub struct ParamStore {
    params: Vec<Param>,
    index: HashMap<String, usize>,
}

impl ParamStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a trainable parameter; a second parameter under the same name replaces the first.
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) {
        let name = name.into();
        match self.index.get(&name) {
            Some(&i) => self.params[i].tensor = tensor,
            None => {
                self.index.insert(name.clone(), self.params.len());
                self.params.push(Param { name, tensor, trainable: true });
            }
        }
    }

    /// The parameter called `name`, or an error naming it.
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.index.get(name).map(|&i| &self.params[i].tensor).ok_or_else(|| Error::NoParam(name.to_string()))
    }

    pub fn get_mut(&mut self, name: &str) -> Result<&mut Param> {
        match self.index.get(name) {
            Some(&i) => Ok(&mut self.params[i]),
            None => Err(Error::NoParam(name.to_string())),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Param> {
        self.params.iter()
    }
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Param> {
        self.params.iter_mut()
    }
    pub fn len(&self) -> usize {
        self.params.len()
    }
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// Total number of scalars.
    pub fn numel(&self) -> usize {
        self.params.iter().map(|p| p.tensor.numel()).sum()
    }
    /// Number of scalars in trainable parameters.
    pub fn trainable_numel(&self) -> usize {
        self.params.iter().filter(|p| p.trainable).map(|p| p.tensor.numel()).sum()
    }
    /// Marks every parameter trainable or frozen.
    pub fn set_trainable(&mut self, trainable: bool) {
        for p in &mut self.params {
            p.trainable = trainable;
        }
    }
}
