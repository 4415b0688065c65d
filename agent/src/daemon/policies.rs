//! Policy files shared by the sandboxes that name them: one compiled
//! policy, one watch and one generation count per file, however many
//! sandboxes use it; a reload compiles it once for all of them.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, Weak},
};

use anyhow::Result;
use tokio::sync::watch;

use crate::policy::PolicyStore;

/// A policy file in use; its watch ends when the last sandbox using it goes.
pub struct SharedPolicy {
    pub store: PolicyStore,
    stop: watch::Sender<bool>,
}

impl Drop for SharedPolicy {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// The policy files in use, by their canonical path.
#[derive(Default)]
pub struct PolicyFiles(Mutex<HashMap<PathBuf, Weak<SharedPolicy>>>);

impl PolicyFiles {
    /// The policy of `path` as loaded already for another sandbox, or loaded
    /// (and watched) now.
    pub fn load(&self, path: &Path, credential_providers: &[String]) -> Result<Arc<SharedPolicy>> {
        let key = path.canonicalize().unwrap_or_else(|_| path.to_owned());
        let mut files = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(shared) = files.get(&key).and_then(Weak::upgrade) {
            return Ok(shared);
        }
        let store = PolicyStore::load(path, credential_providers.to_vec())?;
        let (stop, stopped) = watch::channel(false);
        store.spawn_watch(stopped)?;
        let shared = Arc::new(SharedPolicy { store, stop });
        files.retain(|_, file| file.strong_count() > 0);
        files.insert(key, Arc::downgrade(&shared));
        Ok(shared)
    }

    /// Policy files in use.
    pub fn count(&self) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).values().filter(|file| file.strong_count() > 0).count()
    }
}
