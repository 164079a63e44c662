//! The launcher's one error type. Messages follow QEMU 8.2's wording word for word where QEMU has an
//! equivalent (checked against Debian's QEMU 7.2, whose messages are the same for everything listed here), so
//! scripts and people who know QEMU read them unchanged. [`Error::render`] adds the program-name prefix.

use std::io;

/// Text QEMU appends (unprefixed) after a size that does not parse.
const SIZE_HINT: &str = "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                         and exabytes, respectively.";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error about one command-line option: QEMU prefixes these with the option as written (`-m foo: ...`).
    #[error("{location}: {inner}")]
    At { location: String, inner: Box<Error> },

    // --- grammar -------------------------------------------------------------------------------------------
    #[error("invalid option")]
    InvalidOption,
    #[error("requires an argument")]
    RequiresArgument,
    #[error("Invalid parameter '{0}'")]
    InvalidParameter(String),
    #[error("Parameter '{0}' expects a non-negative number below 2^64\n{SIZE_HINT}")]
    ExpectsSize(String),
    #[error("Value '{value}' is out of range for parameter '{key}'")]
    SizeOutOfRange { key: String, value: String },
    #[error("Parameter '{0}' expects a size value")]
    ExpectsSizeValue(String),
    #[error("Parameter '{0}' expects 'on' or 'off'")]
    ExpectsBool(String),
    #[error("Parameter '{0}' expects a number")]
    ExpectsNumber(String),
    #[error("Parameter '{0}' expects integer")]
    ExpectsInteger(String),
    #[error("Parameter '{0}' is missing")]
    MissingParameter(String),
    #[error("Parameter '{0}' is unexpected")]
    UnexpectedParameter(String),
    #[error("Parameter '{key}' does not accept value '{value}'")]
    DoesNotAccept { key: String, value: String },
    #[error("Property '{owner}.{property}' not found")]
    PropertyNotFound { owner: String, property: String },
    #[error("Duplicate ID '{id}' for {kind}")]
    DuplicateId { id: String, kind: &'static str },

    // --- machine, accelerator, CPU, memory -------------------------------------------------------------------
    #[error("unsupported machine type\nUse -machine help to list supported machines")]
    UnsupportedMachine,
    #[error("invalid accelerator {0}")]
    InvalidAccelerator(String),
    #[error("The -accel and \"-machine accel=\" options are incompatible")]
    AccelIncompatible,
    #[error("unable to find CPU model '{0}'")]
    UnknownCpuModel(String),
    #[error("CPU model 'host' requires KVM or HVF")]
    HostCpuNeedsKvm,
    /// A QEMU message assembled where its parts are known (`-smp` topology checks and the like).
    #[error("{0}")]
    Message(String),
    #[error("Memory backend '{0}' not found")]
    MemoryBackendNotFound(String),
    #[error("Machine memory size does not match the size of the memory backend")]
    MemoryBackendSizeMismatch,
    #[error(
        "invalid value of maxmem: maximum memory size (0x{maxmem:x}) must be at least the initial memory size \
         (0x{size:x})"
    )]
    MaxmemTooSmall { maxmem: u64, size: u64 },
    #[error("slots specified but no max-size")]
    SlotsWithoutMaxmem,
    /// QEMU prints the first line unprefixed: it comes from the KVM code, the second from the accelerator setup.
    #[error("Could not access KVM kernel module: {0}")]
    KvmUnavailable(io::Error),

    // --- devices and boot -----------------------------------------------------------------------------------
    #[error("'{0}' is not a valid device model name")]
    InvalidDevice(String),
    #[error("-initrd only allowed with -kernel option")]
    InitrdWithoutKernel,
    #[error("-append only allowed with -kernel option")]
    AppendWithoutKernel,
    /// QEMU's loader prints these with a literal `qemu:` prefix, not the program name.
    #[error("qemu: could not open kernel file '{path}': {source}")]
    KernelOpen { path: String, source: io::Error },
    #[error("qemu: could not load kernel '{path}': {source}")]
    KernelRead { path: String, source: io::Error },
    #[error("qemu: error reading initrd {path}: Failed to open file “{path}”: open() failed: {source}")]
    InitrdOpen { path: String, source: io::Error },

    // --- character devices ----------------------------------------------------------------------------------
    #[error("'{0}' is not a valid char driver name")]
    InvalidCharDriverName(String),
    #[error("'{0}' is not a valid char driver")]
    InvalidCharDriver(String),
    #[error("could not connect serial device to character backend '{0}'")]
    SerialBackend(String),
    #[error("chardev: no id specified")]
    ChardevNoId,
    #[error("cannot use stdio by multiple character devices")]
    StdioTwice,
    #[error("cannot use stdio with -daemonize")]
    StdioDaemonize,
    #[error("chardev: file: no filename given")]
    FileNoPath,
    #[error("chardev: socket: no port given")]
    SocketNoPort,
    /// QEMU's wording when a socket chardev has neither `path=` nor `host=` (it then wants `fd=`).
    #[error("Unable to parse FD number ")]
    SocketNoAddress,
    #[error("None or one of 'path', 'fd' or 'host' option required.")]
    SocketTwoAddresses,
    #[error("Could not open '{path}': {source}")]
    CouldNotOpen { path: String, source: io::Error },
    #[error("Could not create '{path}': {source}")]
    CouldNotCreate { path: String, source: io::Error },
    #[error("Failed to bind socket to {path}: {source}")]
    BindUnix { path: String, source: io::Error },
    #[error("Failed to bind socket: {0}")]
    BindInet(io::Error),
    #[error("address resolution failed for {host}:{port}: {reason}")]
    Resolve { host: String, port: String, reason: String },
    #[error("Failed to connect to '{target}': {source}")]
    Connect { target: String, source: io::Error },
    #[error("Failed to accept a connection on {target}: {source}")]
    Accept { target: String, source: io::Error },
    #[error("Failed to create a pty: {0}")]
    Pty(io::Error),

    // --- process-level options ------------------------------------------------------------------------------
    #[error("-nographic cannot be used with -daemonize")]
    NographicDaemonize,
    #[error("User \"{0}\" doesn't exist (and is not <uid>:<gid>)")]
    UnknownUser(String),
    #[error("'{0}' is not a directory")]
    NotADirectory(String),
    #[error(
        "{0} is parsed but not enforced yet (the sandbox that applies it is not written); refusing to run less \
         confined than asked"
    )]
    NotEnforcedYet(&'static str),
    #[error("cannot create PID file: {0}")]
    PidFile(String),
    #[error("Error opening logfile {path}: {source}")]
    LogFile { path: String, source: io::Error },
    /// `-d` with an unknown item: QEMU prints the list of items on stdout and exits 1, with no error line.
    #[error("{0}")]
    LogUsage(String),

    /// A QEMU feature Tessera does not have yet.
    #[error("{0} is not supported by tessera yet")]
    NotSupportedYet(String),

    // --- running the process graph --------------------------------------------------------------------------
    #[error("cannot find {binary} (looked in {dir}): {source}")]
    ChildBinary { binary: &'static str, dir: String, source: io::Error },
    #[error("could not start {binary}: {source}")]
    Spawn { binary: &'static str, source: io::Error },
    #[error("{0}")]
    Child(String),
    #[error("{op} failed: {source}")]
    Host { op: &'static str, source: io::Error },
}

impl Error {
    /// Wrap `self` with the option it is about, as QEMU's error location does.
    pub fn at(self, location: impl Into<String>) -> Error {
        Error::At { location: location.into(), inner: Box::new(self) }
    }

    pub fn host(op: &'static str, e: impl Into<io::Error>) -> Error {
        Error::Host { op, source: e.into() }
    }

    fn innermost(&self) -> &Error {
        match self {
            Error::At { inner, .. } => inner.innermost(),
            e => e,
        }
    }

    /// Where the text goes: QEMU prints the `-d` usage on stdout, everything else on stderr.
    pub fn to_stdout(&self) -> bool {
        matches!(self.innermost(), Error::LogUsage(_))
    }

    /// The full text to print (without a final newline), prefixed as QEMU prefixes it when run as `prog`.
    pub fn render(&self, prog: &str) -> String {
        match self.innermost() {
            // The loader's messages carry `qemu:` themselves, and the `-d` usage is a plain list.
            Error::KernelOpen { .. } | Error::KernelRead { .. } | Error::InitrdOpen { .. } | Error::LogUsage(_) => {
                self.innermost().to_string()
            }
            Error::KvmUnavailable(e) => {
                let e = strerror(e);
                format!("Could not access KVM kernel module: {e}\n{prog}: failed to initialize kvm: {e}")
            }
            _ => format!("{prog}: {self}"),
        }
    }
}

/// The C library's text for an I/O error, without Rust's " (os error N)" suffix, as QEMU prints it.
pub fn strerror(e: &io::Error) -> String {
    // std formats OS errors with the C library's strerror_r text followed by " (os error N)".
    let text = e.to_string();
    match e.raw_os_error() {
        Some(n) => text.strip_suffix(&format!(" (os error {n})")).map(str::to_string).unwrap_or(text),
        None => text,
    }
}

/// An `io::Error` whose Display is the bare C text, for messages that embed one.
pub fn os_error(e: impl Into<io::Error>) -> io::Error {
    let e = e.into();
    io::Error::new(e.kind(), strerror(&e))
}

pub type Result<T> = std::result::Result<T, Error>;
