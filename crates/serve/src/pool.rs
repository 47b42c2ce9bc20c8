//! The compute workers: the text tower and the re-rank are CPU-heavy, so they run on
//! dedicated threads, never on the async runtime. The workers share one copy of the model
//! (its forward pass needs `&mut`, so the short query embedding runs under a lock; the
//! first stage and the re-rank, the bulk of the work, run in parallel). Jobs wait in a
//! bounded queue; a full queue is refused at once (503), a job whose request has timed out
//! is dropped unstarted, and a panic while computing becomes a 500 answer (a panic inside
//! the text tower also reloads the model from disk, its scratch state may be half-written).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use demovlp_model::backend::Backend;
use demovlp_model::Model;
use demovlp_search::explain::Explanation;
use demovlp_search::search::{Engine, SearchResult, TextQuery};
use tokio::sync::oneshot;

use crate::error::{panic_message, ApiError};

/// Called by a worker with the query text just before it computes (tests use it to make
/// work slow or to panic; `None` in the server).
pub type Hook = Arc<dyn Fn(&str) + Send + Sync>;

pub enum Task {
    Search { q: String, k: usize, rerank: usize },
    Explain { clip: String, q: String, svg: bool },
}

impl Task {
    fn text(&self) -> &str {
        match self {
            Task::Search { q, .. } | Task::Explain { q, .. } => q,
        }
    }
}

pub enum Output {
    Search(SearchResult),
    Explanation(Box<Explanation>),
    Svg(String),
}

struct Job {
    task: Task,
    deadline: Instant,
    reply: oneshot::Sender<Result<Output, ApiError>>,
}

#[derive(Default)]
pub struct PoolStats {
    /// Jobs waiting in the queue now.
    pub waiting: AtomicUsize,
    /// Jobs being computed now.
    pub running: AtomicUsize,
    pub computed: AtomicU64,
    /// Refused because the queue was full.
    pub rejected: AtomicU64,
    /// Dropped unstarted: their request had timed out or gone.
    pub expired: AtomicU64,
    pub panics: AtomicU64,
}

pub struct Pool {
    tx: Mutex<Option<SyncSender<Job>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    pub stats: Arc<PoolStats>,
    pub capacity: usize,
    pub threads: usize,
}

/// A model that embeds queries, on whichever backend it lives.
pub trait QueryModel: Send {
    fn embed(&mut self, engine: &Engine, text: &str) -> anyhow::Result<TextQuery>;
}

impl<B: Backend> QueryModel for Model<B>
where
    Model<B>: Send,
{
    fn embed(&mut self, engine: &Engine, text: &str) -> anyhow::Result<TextQuery> {
        engine.embed_query(self, text)
    }
}

/// Where the server computes: the text tower of each query and the re-rank scores (the
/// first stage, the index and the workers stay on the host).
pub trait Placement: Send + Sync {
    /// E.g. `cuda:0 NVIDIA H100 (Fp32)`.
    fn name(&self) -> String;
    /// The model of the CPU, copied onto the device.
    fn place(&self, model: Model) -> anyhow::Result<Box<dyn QueryModel>>;
    /// Points the engine's re-rank at the device.
    fn score_on(&self, engine: &mut Engine);
}

/// [`Placement`] on a backend (a GPU's, or the simulated device in tests).
pub struct OnBackend<B: Backend> {
    pub backend: B,
    pub name: String,
}

impl<B: Backend> Placement for OnBackend<B>
where
    Model<B>: Send,
{
    fn name(&self) -> String {
        self.name.clone()
    }
    fn place(&self, model: Model) -> anyhow::Result<Box<dyn QueryModel>> {
        Ok(Box::new(model.on_backend(&self.backend)))
    }
    fn score_on(&self, engine: &mut Engine) {
        engine.score_on(self.backend.clone(), &self.name);
    }
}

/// The one copy of the model the workers share, and where to reload it from.
pub struct SharedModel {
    model: Mutex<Box<dyn QueryModel>>,
    path: Option<PathBuf>,
    device: Option<Arc<dyn Placement>>,
}

impl SharedModel {
    /// `path`: what [`Engine::load_model_from`] loads it from again after a panic (then
    /// placed on `device` again).
    pub fn new(model: Box<dyn QueryModel>, path: Option<PathBuf>, device: Option<Arc<dyn Placement>>) -> SharedModel {
        SharedModel { model: Mutex::new(model), path, device }
    }

    /// Embeds a query under the lock. A panic inside leaves the lock poisoned; the next
    /// caller reloads the model before using it.
    fn embed(&self, engine: &Engine, text: &str) -> anyhow::Result<TextQuery> {
        let mut g = match self.model.lock() {
            Ok(g) => g,
            Err(p) => {
                let mut g = p.into_inner();
                let cpu = engine.load_model_from(self.path.as_deref())?;
                *g = match &self.device {
                    Some(d) => d.place(cpu)?,
                    None => Box::new(cpu),
                };
                self.model.clear_poison();
                g
            }
        };
        g.embed(engine, text)
    }
}

struct Worker {
    engine: Arc<Engine>,
    model: Arc<SharedModel>,
    images: Option<PathBuf>,
    hook: Option<Hook>,
    stats: Arc<PoolStats>,
}

impl Worker {
    fn compute(&self, task: &Task) -> Result<Output, ApiError> {
        if let Some(h) = &self.hook {
            h(task.text());
        }
        let e = &self.engine;
        match task {
            Task::Search { q, k, rerank } => {
                let tq = self.model.embed(e, q).map_err(|err| ApiError::internal(format!("search failed: {err:#}")))?;
                Ok(Output::Search(SearchResult {
                    query: q.clone(),
                    results: e
                        .try_search_embedded(&tq, *k, *rerank)
                        .map_err(|err| ApiError::internal(format!("search failed: {err:#}")))?,
                }))
            }
            Task::Explain { clip, q, svg } => {
                let x = self
                    .model
                    .embed(e, q)
                    .and_then(|tq| e.explain_embedded(&tq, clip))
                    .map_err(|err| ApiError::internal(format!("explain failed: {err:#}")))?;
                if *svg {
                    demovlp_search::explain::svg(&x, self.images.as_deref())
                        .map(Output::Svg)
                        .map_err(|err| ApiError::internal(format!("drawing the SVG failed: {err:#}")))
                } else {
                    Ok(Output::Explanation(Box::new(x)))
                }
            }
        }
    }

    fn run(self, rx: Arc<Mutex<Receiver<Job>>>) {
        loop {
            // Only `recv` runs under the lock (it cannot panic), so the lock is never poisoned.
            let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
            let Ok(job) = job else { break };
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            if job.reply.is_closed() || Instant::now() >= job.deadline {
                self.stats.expired.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            self.stats.running.fetch_add(1, Ordering::SeqCst);
            let r = match catch_unwind(AssertUnwindSafe(|| self.compute(&job.task))) {
                Ok(r) => r,
                Err(p) => {
                    self.stats.panics.fetch_add(1, Ordering::SeqCst);
                    Err(ApiError::internal(format!("internal error while computing the answer: {}", panic_message(&*p))))
                }
            };
            self.stats.running.fetch_sub(1, Ordering::SeqCst);
            self.stats.computed.fetch_add(1, Ordering::SeqCst);
            // The request may have timed out meanwhile; then nobody listens.
            let _ = job.reply.send(r);
        }
    }
}

impl Pool {
    /// `threads` workers sharing `model`; at most `capacity` jobs wait.
    pub fn start(
        engine: Arc<Engine>,
        model: SharedModel,
        threads: usize,
        capacity: usize,
        images: Option<PathBuf>,
        hook: Option<Hook>,
    ) -> std::io::Result<Pool> {
        let (tx, rx) = sync_channel::<Job>(capacity);
        let rx = Arc::new(Mutex::new(rx));
        let stats = Arc::new(PoolStats::default());
        let model = Arc::new(model);
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            let w =
                Worker { engine: engine.clone(), model: model.clone(), images: images.clone(), hook: hook.clone(), stats: stats.clone() };
            let rx = rx.clone();
            workers.push(std::thread::Builder::new().name(format!("serve-worker-{i}")).spawn(move || w.run(rx))?);
        }
        Ok(Pool { tx: Mutex::new(Some(tx)), workers: Mutex::new(workers), stats, capacity, threads })
    }

    /// Queues a task; refused at once (503) when the queue is full.
    pub fn submit(&self, task: Task, deadline: Instant) -> Result<oneshot::Receiver<Result<Output, ApiError>>, ApiError> {
        let (reply, rx) = oneshot::channel();
        let guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let Some(tx) = guard.as_ref() else { return Err(ApiError::busy("the server is shutting down")) };
        self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        match tx.try_send(Job { task, deadline, reply }) {
            Ok(()) => Ok(rx),
            Err(e) => {
                self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
                match e {
                    TrySendError::Full(_) => {
                        self.stats.rejected.fetch_add(1, Ordering::SeqCst);
                        Err(ApiError::busy(format!(
                            "server busy: {} workers computing and {} requests queued (--workers, --queue); retry shortly",
                            self.threads, self.capacity
                        )))
                    }
                    TrySendError::Disconnected(_) => Err(ApiError::busy("the server is shutting down")),
                }
            }
        }
    }

    /// Stops taking jobs; the workers finish the queued ones and exit. Waits for them.
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|p| p.into_inner()));
        for w in workers {
            // A worker thread cannot panic outside catch_unwind; if it did, there is nothing to add.
            let _ = w.join();
        }
    }
}
