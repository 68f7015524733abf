//! Where an export lives: a local directory or a prefix in S3-compatible object storage.
//!
//! ```text
//! --out ./acme-2026-11            Sink::Directory   write_atomic (temp file, fsync, rename)
//! --out s3://bucket/acme/2026-11  Sink::S3          PutObject (all-or-nothing per object)
//!                                                     batches:     If-None-Match: *  (never overwritten)
//!                                                     manifest …:  If-Match: <etag this run saw>
//! ```
//!
//! Both hold the same files under the same names (format.rs). Each object is written whole or not
//! at all, and the manifest is written last, so a reader sees a shorter export, never a torn one.
//! On S3 the exporter never replaces an object it did not read in this run, and never replaces a
//! batch at all: a batch object that already exists must hold exactly the bytes being written
//! (a retry after a crash) or the run stops with `EXPORT_OBJECT_CONFLICT`. Stores that ignore
//! conditional headers keep everything else, but lose that guard (docs/design/audit-export.md).

use super::format::{
    CHECKPOINT_FILE, KEYS_FILE, MANIFEST_FILE, Manifest, batch_file_name, write_atomic,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// Deadline of one S3 operation, retries included: a stalled store fails the export instead of
/// hanging it (the decision path never waits on an export anyway).
pub const S3_OPERATION_TIMEOUT: Duration = Duration::from_secs(60);
/// Deadline of one TCP/TLS connect to the store.
pub const S3_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// An export location as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A local directory.
    Directory(PathBuf),
    /// `s3://bucket/prefix`: every object key starts with `prefix` (empty, or ending in `/`).
    S3 {
        /// Bucket name.
        bucket: String,
        /// Key prefix, normalised to end in `/` unless empty.
        prefix: String,
    },
}

impl Location {
    /// Parses `s3://bucket[/prefix]` or a directory path.
    ///
    /// # Errors
    /// [`SinkError::LocationInvalid`] for an `s3://` URL without a valid bucket name.
    pub fn parse(value: &str) -> Result<Self, SinkError> {
        let Some(rest) = value.strip_prefix("s3://") else {
            if value.is_empty() {
                return Err(SinkError::LocationInvalid("empty location".into()));
            }
            return Ok(Self::Directory(PathBuf::from(value)));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        // S3 bucket naming rules (3-63 of a-z, 0-9, '.', '-'), which also keeps the bucket out of
        // the endpoint's host and path syntax.
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
            && bucket
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric());
        if !bucket_ok {
            return Err(SinkError::LocationInvalid(format!(
                "{value}: not a valid bucket name in s3://bucket/prefix"
            )));
        }
        let prefix = prefix.trim_matches('/');
        if prefix
            .split('/')
            .any(|segment| segment == "." || segment == "..")
        {
            return Err(SinkError::LocationInvalid(format!(
                "{value}: the prefix may not hold . or .. segments"
            )));
        }
        let prefix = if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}/")
        };
        Ok(Self::S3 {
            bucket: bucket.to_owned(),
            prefix,
        })
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Directory(path) => write!(f, "{}", path.display()),
            Self::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

impl std::str::FromStr for Location {
    type Err = SinkError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Self::parse(value)
    }
}

/// How to reach S3. Credentials always come from the standard AWS chain (environment, shared
/// files, web identity, ECS, IMDS), never from flags.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct S3Settings {
    /// Endpoint of an S3-compatible store (MinIO, Ceph, moto, a VPC endpoint); path-style
    /// addressing is used whenever it is set. `None`: the AWS regional endpoint.
    pub endpoint_url: Option<String>,
    /// Region override; `None` takes it from the chain (`AWS_REGION`, profile).
    pub region: Option<String>,
}

/// Why the export location cannot be read or written. Every variant has a stable code.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The `--out`/source argument is not a directory or a valid `s3://bucket/prefix`.
    #[error("location: {0}")]
    LocationInvalid(String),
    /// The S3 client cannot be configured (no region).
    #[error("s3 settings: {0}")]
    ConfigInvalid(String),
    /// A local file operation failed.
    #[error("{object}: {source}")]
    Io {
        /// File.
        object: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The bucket does not exist.
    #[error("bucket {bucket} does not exist")]
    BucketMissing {
        /// Bucket.
        bucket: String,
    },
    /// The store refused the credentials or the operation.
    #[error("{object}: access denied: {reason}")]
    Denied {
        /// Object.
        object: String,
        /// The store's answer.
        reason: String,
    },
    /// The store cannot be reached, timed out or answered 5xx.
    #[error("{object}: storage unavailable: {reason}")]
    Unavailable {
        /// Object.
        object: String,
        /// Cause.
        reason: String,
    },
    /// Any other error answer of the store.
    #[error("{object}: {reason}")]
    Storage {
        /// Object.
        object: String,
        /// The store's answer.
        reason: String,
    },
    /// An object that is never overwritten exists with other bytes.
    #[error("{object} already exists with different content; it is never overwritten")]
    ObjectConflict {
        /// Object.
        object: String,
    },
    /// An object changed between this run's read and its conditional write: another writer uses
    /// the same location.
    #[error("{object} changed after this run read it; another writer is using this location")]
    ConcurrentWriter {
        /// Object.
        object: String,
    },
}

impl SinkError {
    /// The stable code.
    pub const fn code(&self) -> &'static str {
        match self {
            Self::LocationInvalid(_) => "EXPORT_LOCATION_INVALID",
            Self::ConfigInvalid(_) => "EXPORT_STORAGE_CONFIG_INVALID",
            Self::Io { .. } => "EXPORT_IO",
            Self::BucketMissing { .. } => "EXPORT_BUCKET_NOT_FOUND",
            Self::Denied { .. } => "EXPORT_STORAGE_DENIED",
            Self::Unavailable { .. } => "EXPORT_STORAGE_UNAVAILABLE",
            Self::Storage { .. } => "EXPORT_STORAGE_ERROR",
            Self::ObjectConflict { .. } => "EXPORT_OBJECT_CONFLICT",
            Self::ConcurrentWriter { .. } => "EXPORT_CONCURRENT_WRITER",
        }
    }
}

/// An opened export location.
#[derive(Debug)]
pub enum Sink {
    /// A local directory.
    Directory(PathBuf),
    /// A prefix in a bucket.
    S3(S3Store),
}

impl Sink {
    /// Opens `location`; for S3 this builds a client from the AWS chain and `settings` (it does
    /// not contact the store yet).
    ///
    /// # Errors
    /// [`SinkError::ConfigInvalid`] when no region is configured for S3.
    pub async fn open(location: &Location, settings: &S3Settings) -> Result<Self, SinkError> {
        Ok(match location {
            Location::Directory(path) => Self::Directory(path.clone()),
            Location::S3 { bucket, prefix } => {
                Self::S3(S3Store::connect(bucket, prefix, settings).await?)
            }
        })
    }

    /// The location, for messages.
    pub fn describe(&self) -> String {
        match self {
            Self::Directory(path) => path.display().to_string(),
            Self::S3(store) => format!("s3://{}/{}", store.bucket, store.prefix),
        }
    }

    /// True when the location holds nothing (a directory is created when missing).
    ///
    /// # Errors
    /// Storage or I/O failures; [`SinkError::BucketMissing`] for a missing bucket.
    pub async fn is_empty(&self) -> Result<bool, SinkError> {
        match self {
            Self::Directory(dir) => {
                std::fs::create_dir_all(dir).map_err(io(dir))?;
                Ok(std::fs::read_dir(dir).map_err(io(dir))?.next().is_none())
            }
            Self::S3(store) => store.is_empty().await,
        }
    }

    /// The bytes of `name`, or `None` when it does not exist.
    ///
    /// # Errors
    /// Storage or I/O failures.
    pub async fn read(&self, name: &str) -> Result<Option<Vec<u8>>, SinkError> {
        match self {
            Self::Directory(dir) => {
                let path = dir.join(name);
                match std::fs::read(&path) {
                    Ok(bytes) => Ok(Some(bytes)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(io(&path)(e)),
                }
            }
            Self::S3(store) => store.get(name).await,
        }
    }

    /// Replaces `name` with `bytes`, whole or not at all. On S3 the write is conditional on the
    /// object being as this handle last saw it ([`SinkError::ConcurrentWriter`] otherwise).
    ///
    /// # Errors
    /// Storage or I/O failures; the previous content is then unchanged.
    pub async fn replace(&self, name: &str, bytes: &[u8]) -> Result<(), SinkError> {
        match self {
            Self::Directory(dir) => write_atomic_in(dir, name, bytes),
            Self::S3(store) => store.put_replace(name, bytes).await,
        }
    }

    /// Writes a batch file. On S3 an existing object must already hold exactly `bytes`
    /// ([`SinkError::ObjectConflict`] otherwise): batch objects are never overwritten. In a
    /// directory an unlisted file left by a crash is replaced, as before the S3 sink existed.
    ///
    /// # Errors
    /// Storage or I/O failures, [`SinkError::ObjectConflict`].
    pub async fn write_batch(&self, name: &str, bytes: &[u8]) -> Result<(), SinkError> {
        match self {
            Self::Directory(dir) => write_atomic_in(dir, name, bytes),
            Self::S3(store) => store.put_immutable(name, bytes).await,
        }
    }

    /// Writes an immutable object (a published checkpoint): created when missing, accepted when
    /// it already holds exactly `bytes`, refused otherwise, in both kinds of location.
    ///
    /// # Errors
    /// Storage or I/O failures, [`SinkError::ObjectConflict`].
    pub async fn create(&self, name: &str, bytes: &[u8]) -> Result<(), SinkError> {
        match self {
            Self::Directory(dir) => {
                match self.read(name).await? {
                    Some(existing) if existing == bytes => return Ok(()),
                    Some(_) => {
                        return Err(SinkError::ObjectConflict {
                            object: dir.join(name).display().to_string(),
                        });
                    }
                    None => {}
                }
                write_atomic_in(dir, name, bytes)
            }
            Self::S3(store) => store.put_immutable(name, bytes).await,
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SinkError + '_ {
    move |source| SinkError::Io {
        object: path.display().to_string(),
        source,
    }
}

/// [`write_atomic`] for a `name` that may hold `/` (published checkpoints).
fn write_atomic_in(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), SinkError> {
    let path = dir.join(name);
    let (parent, file) = match name.rsplit_once('/') {
        Some((sub, file)) => (dir.join(sub), file),
        None => (dir.to_owned(), name),
    };
    std::fs::create_dir_all(&parent).map_err(io(&parent))?;
    write_atomic(&parent, file, bytes).map_err(io(&path))
}

/// A prefix in a bucket, through aws-sdk-s3.
pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    /// What this handle last saw of each object it read or wrote: `Some(etag)`, or `None` when
    /// it was absent. Replacements are conditional on it.
    seen: Mutex<HashMap<String, Option<String>>>,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Hand-written: the SDK client (and its credentials provider) is not formatted.
        f.debug_struct("S3Store")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Result of a conditional PutObject.
enum Put {
    Written(Option<String>),
    PreconditionFailed,
}

impl S3Store {
    /// Builds a client from the standard AWS chain plus `settings`, then [`S3Store::from_client`].
    ///
    /// # Errors
    /// [`SinkError::ConfigInvalid`] when no region is configured anywhere.
    pub async fn connect(
        bucket: &str,
        prefix: &str,
        settings: &S3Settings,
    ) -> Result<Self, SinkError> {
        use aws_config::{BehaviorVersion, Region, timeout::TimeoutConfig};
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(spendguard_evidence::kms::https_client())
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_timeout(S3_OPERATION_TIMEOUT)
                    .connect_timeout(S3_CONNECT_TIMEOUT)
                    .build(),
            );
        if let Some(region) = &settings.region {
            loader = loader.region(Region::new(region.clone()));
        }
        let sdk_config = loader.load().await;
        if sdk_config.region().is_none() {
            return Err(SinkError::ConfigInvalid(
                "no region: set AWS_REGION or --s3-region (SPENDGUARD_S3_REGION)".into(),
            ));
        }
        let mut config = aws_sdk_s3::config::Builder::from(&sdk_config);
        if let Some(endpoint_url) = &settings.endpoint_url {
            // S3-compatible stores rarely serve virtual-hosted buckets.
            config = config.endpoint_url(endpoint_url).force_path_style(true);
        }
        Ok(Self::from_client(
            aws_sdk_s3::Client::from_conf(config.build()),
            bucket,
            prefix,
        ))
    }

    /// Wraps a configured client. `prefix` is used as given (empty, or ending in `/`).
    pub fn from_client(client: aws_sdk_s3::Client, bucket: &str, prefix: &str) -> Self {
        Self {
            client,
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            seen: Mutex::new(HashMap::new()),
        }
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn url(&self, name: &str) -> String {
        format!("s3://{}/{}", self.bucket, self.key(name))
    }

    fn remember(&self, name: &str, etag: Option<String>) {
        self.seen
            .lock()
            .expect("the seen map is never poisoned: no code panics while holding it")
            .insert(name.to_owned(), etag);
    }

    async fn is_empty(&self) -> Result<bool, SinkError> {
        let listed = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&self.prefix)
            .max_keys(1)
            .send()
            .await
            .map_err(|e| self.classify(&self.url(""), e))?;
        Ok(listed.contents().is_empty())
    }

    async fn get(&self, name: &str) -> Result<Option<Vec<u8>>, SinkError> {
        let object = self.url(name);
        let output = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.key(name))
            .send()
            .await
        {
            Ok(output) => output,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => {
                self.remember(name, None);
                return Ok(None);
            }
            Err(e) => return Err(self.classify(&object, e)),
        };
        let etag = output.e_tag().map(str::to_owned);
        let bytes = output
            .body
            .collect()
            .await
            .map_err(|e| SinkError::Unavailable {
                object: object.clone(),
                reason: e.to_string(),
            })?
            .into_bytes()
            .to_vec();
        self.remember(name, etag);
        Ok(Some(bytes))
    }

    async fn put(
        &self,
        name: &str,
        bytes: &[u8],
        if_none_match: bool,
        if_match: Option<String>,
    ) -> Result<Put, SinkError> {
        let mut request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.key(name))
            .body(ByteStream::from(bytes.to_vec()));
        if if_none_match {
            request = request.if_none_match("*");
        }
        if let Some(etag) = if_match {
            request = request.if_match(etag);
        }
        match request.send().await {
            Ok(output) => Ok(Put::Written(output.e_tag().map(str::to_owned))),
            // 412: the condition failed; 409 ConditionalRequestConflict: a concurrent
            // conditional write to the same key won.
            Err(e) if matches!(status(&e), Some(412 | 409)) => Ok(Put::PreconditionFailed),
            Err(e) => Err(self.classify(&self.url(name), e)),
        }
    }

    /// Creates `name`, or accepts an existing object with exactly these bytes.
    async fn put_immutable(&self, name: &str, bytes: &[u8]) -> Result<(), SinkError> {
        match self.put(name, bytes, true, None).await? {
            Put::Written(etag) => {
                self.remember(name, etag);
                Ok(())
            }
            Put::PreconditionFailed => match self.get(name).await? {
                Some(existing) if existing == bytes => Ok(()),
                // Deleted between the two calls: a writer that is not us is at work.
                None => Err(SinkError::ConcurrentWriter {
                    object: self.url(name),
                }),
                Some(_) => Err(SinkError::ObjectConflict {
                    object: self.url(name),
                }),
            },
        }
    }

    /// Replaces `name` if it is still as this handle last saw it. An object never read or
    /// written by this handle is replaced unconditionally.
    async fn put_replace(&self, name: &str, bytes: &[u8]) -> Result<(), SinkError> {
        let seen = self
            .seen
            .lock()
            .expect("the seen map is never poisoned: no code panics while holding it")
            .get(name)
            .cloned();
        let (if_none_match, if_match) = match seen {
            Some(Some(etag)) => (false, Some(etag)),
            Some(None) => (true, None),
            None => (false, None),
        };
        match self.put(name, bytes, if_none_match, if_match).await? {
            Put::Written(etag) => {
                self.remember(name, etag);
                Ok(())
            }
            Put::PreconditionFailed => Err(SinkError::ConcurrentWriter {
                object: self.url(name),
            }),
        }
    }

    /// Copies the export under this prefix into `dir` for the offline verifier: the manifest,
    /// keys.json, checkpoint.txt and every batch the manifest lists under its expected name.
    /// Missing objects are left missing, and a manifest that does not parse is copied alone, so
    /// the verifier reports them with its own codes; nothing is judged here.
    ///
    /// # Errors
    /// Storage failures other than a missing object; I/O failures in `dir`.
    pub async fn download_export(&self, dir: &Path) -> Result<(), SinkError> {
        let Some(manifest_bytes) = self.get(MANIFEST_FILE).await? else {
            return Ok(());
        };
        write_atomic_in(dir, MANIFEST_FILE, &manifest_bytes)?;
        let mut names = vec![KEYS_FILE.to_owned(), CHECKPOINT_FILE.to_owned()];
        if let Ok(manifest) = serde_json::from_slice::<Manifest>(&manifest_bytes) {
            // Only the names the verifier accepts, in order; anything else is its
            // MANIFEST_INVALID to report.
            names.extend(
                manifest
                    .batches
                    .iter()
                    .enumerate()
                    .take_while(|(i, b)| b.file == batch_file_name(i + 1))
                    .map(|(_, b)| b.file.clone()),
            );
        }
        for name in names {
            if let Some(bytes) = self.get(&name).await? {
                write_atomic_in(dir, &name, &bytes)?;
            }
        }
        Ok(())
    }

    /// The object at `key` exactly (no prefix), e.g. a published checkpoint.
    ///
    /// # Errors
    /// Storage failures; a missing object is `None`.
    pub async fn get_key(&self, key: &str) -> Result<Option<Vec<u8>>, SinkError> {
        let root = Self::from_client(self.client.clone(), &self.bucket, "");
        root.get(key).await
    }

    fn classify<E>(&self, object: &str, error: SdkError<E>) -> SinkError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let reason = DisplayErrorContext(&error).to_string();
        let object = object.to_owned();
        match &error {
            SdkError::ServiceError(service) => {
                let code = service.err().code();
                let http = service.raw().status().as_u16();
                if code == Some("NoSuchBucket") {
                    SinkError::BucketMissing {
                        bucket: self.bucket.clone(),
                    }
                } else if http == 403 || code == Some("AccessDenied") {
                    SinkError::Denied { object, reason }
                } else if http >= 500 {
                    SinkError::Unavailable { object, reason }
                } else {
                    SinkError::Storage { object, reason }
                }
            }
            SdkError::TimeoutError(_)
            | SdkError::DispatchFailure(_)
            | SdkError::ResponseError(_) => SinkError::Unavailable { object, reason },
            _ => SinkError::Storage { object, reason },
        }
    }
}

fn status<E>(error: &SdkError<E>) -> Option<u16> {
    match error {
        SdkError::ServiceError(service) => Some(service.raw().status().as_u16()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse() {
        assert_eq!(
            Location::parse("s3://audit-bucket/acme/2026-11/").unwrap(),
            Location::S3 {
                bucket: "audit-bucket".into(),
                prefix: "acme/2026-11/".into()
            }
        );
        assert_eq!(
            Location::parse("s3://audit-bucket").unwrap(),
            Location::S3 {
                bucket: "audit-bucket".into(),
                prefix: String::new()
            }
        );
        assert_eq!(
            Location::parse("./out").unwrap(),
            Location::Directory("./out".into())
        );
        for bad in ["s3://", "s3://A_b/x", "s3://ab/x", "s3://bucket/a/../b", ""] {
            let error = Location::parse(bad).unwrap_err();
            assert_eq!(error.code(), "EXPORT_LOCATION_INVALID", "{bad}");
        }
        assert_eq!(
            Location::parse("s3://audit-bucket/acme")
                .unwrap()
                .to_string(),
            "s3://audit-bucket/acme/"
        );
    }
}
