//! `visor run --gdb`: a gdb remote stub on every engine, with the `gdbstub`
//! crate doing the protocol.
//!
//! The VM starts stopped before its first instruction and waits for a
//! debugger, as `qemu -s -S` does. While gdb lets it run, a watcher thread
//! polls the connection and pauses the VM ([`crate::vmm::Pauser`]) when
//! bytes arrive (Ctrl-C, or anything else gdb sends); breakpoints,
//! watchpoints and single-step are the engine's
//! ([`vcpu::Vcpu::set_guest_debug`]): the guest's own debug registers and
//! memory are never touched, so a breakpoint in code the guest rewrites
//! stays where it was put. Guest-virtual addresses go through the guest's
//! current page tables (the VMM's walk, which sets no accessed bit).
//!
//! One client at a time: another that connects meanwhile is closed at once.
//! When a client goes away without killing the guest, the guest runs on and
//! a new client may connect (and stops it). Packets are framed and their
//! checksums checked here before `gdbstub` sees them: bytes outside a packet
//! are dropped, a packet with a bad checksum or too long for the buffer is
//! answered with `-`, and a packet `gdbstub` cannot parse is answered with
//! an error and the session goes on.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use gdbstub::arch::{Arch, RegId, Registers};
use gdbstub::common::Signal;
use gdbstub::conn::Connection;
use gdbstub::stub::state_machine::GdbStubStateMachine;
use gdbstub::stub::{DisconnectReason, GdbStub, GdbStubError, SingleThreadStopReason};
use gdbstub::target::ext::base::single_register_access::{
    SingleRegisterAccess, SingleRegisterAccessOps,
};
use gdbstub::target::ext::base::singlethread::{
    SingleThreadBase, SingleThreadResume, SingleThreadResumeOps, SingleThreadSingleStep,
    SingleThreadSingleStepOps,
};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, HwBreakpoint, HwBreakpointOps, HwWatchpoint, HwWatchpointOps,
    SwBreakpoint, SwBreakpointOps, WatchKind as GdbWatchKind,
};
use gdbstub::target::ext::monitor_cmd::{outputln, ConsoleOutput, MonitorCmd, MonitorCmdOps};
use gdbstub::target::{Target, TargetError, TargetResult};
use vcpu::{DebugEvent, GuestDebug, WatchKind, Watchpoint};

use crate::vmm::{Outcome, Pauser, Vm};
use crate::Stats;

/// Where `--gdb` listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GdbAddr {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

/// Parses `--gdb [HOST:]PORT` (host 127.0.0.1 by default) or a Unix socket
/// path (anything with a `/`).
pub fn parse_addr(s: &str) -> Result<GdbAddr, String> {
    let bad = |why: &str| format!("--gdb {s:?}: {why} (expected [HOST:]PORT or a socket path)");
    if s.contains('/') {
        return Ok(GdbAddr::Unix(PathBuf::from(s)));
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h.trim_start_matches('[').trim_end_matches(']'), p),
        None => ("127.0.0.1", s),
    };
    let port: u16 = port
        .parse()
        .map_err(|_| bad(&format!("{port:?} is not a port number")))?;
    if host.is_empty() {
        return Err(bad("empty host"));
    }
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(|e| bad(&format!("host {host:?}: {e}")))?
        .next()
        .ok_or_else(|| bad(&format!("host {host:?} has no address")))?;
    Ok(GdbAddr::Tcp(addr))
}

/// A bound `--gdb` socket.
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// A Unix socket (removed when the listener goes).
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds `addr`.
    pub fn bind(addr: &GdbAddr) -> Result<Listener, String> {
        match addr {
            GdbAddr::Tcp(a) => TcpListener::bind(a)
                .map(Listener::Tcp)
                .map_err(|e| format!("--gdb {a}: cannot listen: {e}")),
            GdbAddr::Unix(p) => UnixListener::bind(p)
                .map(|l| Listener::Unix(l, p.clone()))
                .map_err(|e| format!("--gdb {}: cannot listen: {e}", p.display())),
        }
    }

    /// Where it listens, for the message to the user.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "?".into(), |a| a.to_string()),
            Listener::Unix(_, p) => p.display().to_string(),
        }
    }

    fn accept(&self) -> std::io::Result<Stream> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            Listener::Unix(l, _) => Ok(Stream::Unix(l.accept()?.0)),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Removes a Unix socket's file when the session loop ends: the listener
/// itself lives on in the accept thread (blocked in `accept`) until the
/// process exits, and its drop never comes.
struct SocketFile(Option<PathBuf>);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// One client's connection.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn try_clone(&self) -> std::io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    fn fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }

    /// Sends all of `buf` with MSG_NOSIGNAL: a client that closed its end is
    /// an error (EPIPE) here, never a SIGPIPE, which kills visor (it keeps
    /// the default disposition, for output into a closed pipe).
    fn write_all(&mut self, mut buf: &[u8]) -> std::io::Result<()> {
        let fd = self.fd();
        while !buf.is_empty() {
            // SAFETY: `buf` is a live slice of `buf.len()` readable bytes and
            // `fd` a socket this stream owns for the call.
            let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            buf = &buf[n as usize..];
        }
        Ok(())
    }
}

/// The write side `gdbstub` talks to: buffered until a packet is flushed.
struct Conn {
    stream: Stream,
    out: Vec<u8>,
}

impl Connection for Conn {
    type Error = std::io::Error;

    fn write(&mut self, byte: u8) -> std::io::Result<()> {
        self.out.push(byte);
        Ok(())
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.out.extend_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let r = self.stream.write_all(&self.out);
        self.out.clear();
        r
    }
}

/// The largest packet accepted (and the stub's buffer).
const PACKET_MAX: usize = 4096;

/// What the framer makes of the bytes a client sends.
#[derive(Debug, PartialEq, Eq)]
enum Frame {
    /// `+`, `-` or Ctrl-C (0x03) outside a packet.
    Byte(u8),
    /// A whole packet, `$` to the checksum, with a good checksum.
    Packet(Vec<u8>),
    /// A packet with a bad checksum or too long: answered with `-`.
    Bad,
}

/// Frames packets and checks their checksums.
#[derive(Default)]
struct Framer {
    pkt: Vec<u8>,
    /// Inside a packet; then the checksum digits still to come once `#` was
    /// seen.
    inside: bool,
    sum_left: Option<u8>,
    too_long: bool,
}

impl Framer {
    fn push(&mut self, b: u8) -> Option<Frame> {
        if !self.inside {
            return match b {
                b'$' => {
                    self.inside = true;
                    self.pkt.clear();
                    self.pkt.push(b);
                    self.sum_left = None;
                    self.too_long = false;
                    None
                }
                b'+' | b'-' | 0x03 => Some(Frame::Byte(b)),
                _ => None,
            };
        }
        if self.pkt.len() >= PACKET_MAX {
            self.too_long = true;
        } else {
            self.pkt.push(b);
        }
        match self.sum_left {
            None if b == b'#' => self.sum_left = Some(2),
            None => {}
            Some(n) => {
                self.sum_left = Some(n - 1);
                if n == 1 {
                    self.inside = false;
                    return Some(self.finish());
                }
            }
        }
        None
    }

    fn finish(&mut self) -> Frame {
        let p = std::mem::take(&mut self.pkt);
        if self.too_long || p.len() < 4 {
            return Frame::Bad;
        }
        let body = &p[1..p.len() - 3];
        let sum = body.iter().fold(0u8, |s, &b| s.wrapping_add(b));
        let given = std::str::from_utf8(&p[p.len() - 2..])
            .ok()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        if given == Some(sum) {
            Frame::Packet(p)
        } else {
            Frame::Bad
        }
    }
}

/// The most bytes one `m` packet reads: as many as a reply of
/// [`PACKET_MAX`] holds in hex. gdb asks no more than that.
const READ_MAX: u64 = PACKET_MAX as u64 / 2;

/// A memory read (`m ADDR,LEN`) for more than [`READ_MAX`] bytes becomes
/// one for [`READ_MAX`] (the protocol lets a reply hold fewer bytes than
/// asked): `gdbstub` would otherwise stream all of it (`m0,ffffffffffffffff`
/// is 2^64 bytes, which would hold the VMM for hours) and would step past
/// the top of the address space. Other packets pass unchanged.
fn clamp_read(p: Vec<u8>) -> Vec<u8> {
    let body = &p[1..p.len() - 3];
    let Some(args) = body.strip_prefix(b"m") else {
        return p;
    };
    let Some((addr, len)) = std::str::from_utf8(args)
        .ok()
        .and_then(|a| a.split_once(','))
    else {
        return p;
    };
    match u64::from_str_radix(len, 16) {
        Ok(n) if n > READ_MAX => packet(&format!("m{addr},{READ_MAX:x}")),
        _ => p,
    }
}

/// A reply packet with `body`.
fn packet(body: &str) -> Vec<u8> {
    let sum = body.bytes().fold(0u8, |s, b| s.wrapping_add(b));
    format!("${body}#{sum:02x}").into_bytes()
}

// ---- the architecture: gdb's amd64 registers and FS/GS base -------------

/// x86-64 as gdb sees visor's guest: the core and SSE registers of gdb's
/// amd64 description, and FS and GS base.
pub enum VisorX86_64 {}

/// The register file of [`VisorX86_64`]. The x87 and SSE registers are
/// reported unavailable (the engine contract does not carry them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GdbRegs {
    /// RAX, RBX, RCX, RDX, RSI, RDI, RBP, RSP, R8-R15 (gdb's order).
    pub gpr: [u64; 16],
    /// RIP.
    pub rip: u64,
    /// EFLAGS.
    pub eflags: u32,
    /// CS, SS, DS, ES, FS, GS selectors.
    pub seg: [u32; 6],
    /// FS base.
    pub fs_base: u64,
    /// GS base.
    pub gs_base: u64,
}

/// Bytes of the x87 and SSE registers between the segments and FS base in
/// the `g` packet: ST0-7 (10 each), 8 control registers (4 each), XMM0-15
/// (16 each), MXCSR (4).
const FPU_SSE_BYTES: usize = 8 * 10 + 8 * 4 + 16 * 16 + 4;
/// Where the x87 and SSE registers start.
const FPU_SSE_AT: usize = 16 * 8 + 8 + 4 + 6 * 4;

impl Registers for GdbRegs {
    type ProgramCounter = u64;

    fn pc(&self) -> u64 {
        self.rip
    }

    fn gdb_serialize(&self, mut write_byte: impl FnMut(Option<u8>)) {
        let mut put = |b: &[u8]| b.iter().for_each(|&b| write_byte(Some(b)));
        for r in &self.gpr {
            put(&r.to_le_bytes());
        }
        put(&self.rip.to_le_bytes());
        put(&self.eflags.to_le_bytes());
        for s in &self.seg {
            put(&s.to_le_bytes());
        }
        for _ in 0..FPU_SSE_BYTES {
            write_byte(None);
        }
        for b in self
            .fs_base
            .to_le_bytes()
            .iter()
            .chain(&self.gs_base.to_le_bytes())
        {
            write_byte(Some(*b));
        }
    }

    fn gdb_deserialize(&mut self, bytes: &[u8]) -> Result<(), ()> {
        let need = FPU_SSE_AT + FPU_SSE_BYTES + 16;
        if bytes.len() < need {
            return Err(());
        }
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap());
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
        for (i, r) in self.gpr.iter_mut().enumerate() {
            *r = u64_at(i * 8);
        }
        self.rip = u64_at(128);
        self.eflags = u32_at(136);
        for (i, s) in self.seg.iter_mut().enumerate() {
            *s = u32_at(140 + i * 4);
        }
        self.fs_base = u64_at(FPU_SSE_AT + FPU_SSE_BYTES);
        self.gs_base = u64_at(FPU_SSE_AT + FPU_SSE_BYTES + 8);
        Ok(())
    }
}

/// A register of [`VisorX86_64`] by gdb's number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GdbRegId {
    /// A general register, gdb's order (0-15).
    Gpr(u8),
    /// RIP.
    Rip,
    /// EFLAGS.
    Eflags,
    /// A segment selector: CS, SS, DS, ES, FS, GS (0-5).
    Seg(u8),
    /// An x87 or SSE register (reported unavailable).
    FpuSse,
    /// FS base.
    FsBase,
    /// GS base.
    GsBase,
}

impl RegId for GdbRegId {
    fn from_raw_id(id: usize) -> Option<(Self, Option<NonZeroUsize>)> {
        let (r, size) = match id {
            0..=15 => (GdbRegId::Gpr(id as u8), 8),
            16 => (GdbRegId::Rip, 8),
            17 => (GdbRegId::Eflags, 4),
            18..=23 => (GdbRegId::Seg(id as u8 - 18), 4),
            24..=31 => (GdbRegId::FpuSse, 10),
            32..=39 => (GdbRegId::FpuSse, 4),
            40..=55 => (GdbRegId::FpuSse, 16),
            56 => (GdbRegId::FpuSse, 4),
            57 => (GdbRegId::FsBase, 8),
            58 => (GdbRegId::GsBase, 8),
            _ => return None,
        };
        Some((r, NonZeroUsize::new(size)))
    }
}

impl Arch for VisorX86_64 {
    type Usize = u64;
    type Registers = GdbRegs;
    type BreakpointKind = usize;
    type RegId = GdbRegId;

    fn target_description_xml() -> Option<&'static str> {
        Some(TARGET_XML)
    }
}

/// gdb's amd64 features (core, SSE, segments) in gdb's register order: the
/// numbers of [`GdbRegId`].
const TARGET_XML: &str = r#"<?xml version="1.0"?>
<!DOCTYPE target SYSTEM "gdb-target.dtd">
<target version="1.0">
<architecture>i386:x86-64</architecture>
<feature name="org.gnu.gdb.i386.core">
<flags id="i386_eflags" size="4">
<field name="CF" start="0" end="0"/><field name="" start="1" end="1"/>
<field name="PF" start="2" end="2"/><field name="AF" start="4" end="4"/>
<field name="ZF" start="6" end="6"/><field name="SF" start="7" end="7"/>
<field name="TF" start="8" end="8"/><field name="IF" start="9" end="9"/>
<field name="DF" start="10" end="10"/><field name="OF" start="11" end="11"/>
<field name="NT" start="14" end="14"/><field name="RF" start="16" end="16"/>
<field name="VM" start="17" end="17"/><field name="AC" start="18" end="18"/>
<field name="VIF" start="19" end="19"/><field name="VIP" start="20" end="20"/>
<field name="ID" start="21" end="21"/>
</flags>
<reg name="rax" bitsize="64" type="int64" regnum="0"/>
<reg name="rbx" bitsize="64" type="int64"/>
<reg name="rcx" bitsize="64" type="int64"/>
<reg name="rdx" bitsize="64" type="int64"/>
<reg name="rsi" bitsize="64" type="int64"/>
<reg name="rdi" bitsize="64" type="int64"/>
<reg name="rbp" bitsize="64" type="data_ptr"/>
<reg name="rsp" bitsize="64" type="data_ptr"/>
<reg name="r8" bitsize="64" type="int64"/>
<reg name="r9" bitsize="64" type="int64"/>
<reg name="r10" bitsize="64" type="int64"/>
<reg name="r11" bitsize="64" type="int64"/>
<reg name="r12" bitsize="64" type="int64"/>
<reg name="r13" bitsize="64" type="int64"/>
<reg name="r14" bitsize="64" type="int64"/>
<reg name="r15" bitsize="64" type="int64"/>
<reg name="rip" bitsize="64" type="code_ptr"/>
<reg name="eflags" bitsize="32" type="i386_eflags"/>
<reg name="cs" bitsize="32" type="int32"/>
<reg name="ss" bitsize="32" type="int32"/>
<reg name="ds" bitsize="32" type="int32"/>
<reg name="es" bitsize="32" type="int32"/>
<reg name="fs" bitsize="32" type="int32"/>
<reg name="gs" bitsize="32" type="int32"/>
<reg name="st0" bitsize="80" type="i387_ext"/>
<reg name="st1" bitsize="80" type="i387_ext"/>
<reg name="st2" bitsize="80" type="i387_ext"/>
<reg name="st3" bitsize="80" type="i387_ext"/>
<reg name="st4" bitsize="80" type="i387_ext"/>
<reg name="st5" bitsize="80" type="i387_ext"/>
<reg name="st6" bitsize="80" type="i387_ext"/>
<reg name="st7" bitsize="80" type="i387_ext"/>
<reg name="fctrl" bitsize="32" type="int" group="float"/>
<reg name="fstat" bitsize="32" type="int" group="float"/>
<reg name="ftag" bitsize="32" type="int" group="float"/>
<reg name="fiseg" bitsize="32" type="int" group="float"/>
<reg name="fioff" bitsize="32" type="int" group="float"/>
<reg name="foseg" bitsize="32" type="int" group="float"/>
<reg name="fooff" bitsize="32" type="int" group="float"/>
<reg name="fop" bitsize="32" type="int" group="float"/>
</feature>
<feature name="org.gnu.gdb.i386.sse">
<vector id="v4f" type="ieee_single" count="4"/>
<vector id="v2d" type="ieee_double" count="2"/>
<vector id="v16i8" type="int8" count="16"/>
<vector id="v8i16" type="int16" count="8"/>
<vector id="v4i32" type="int32" count="4"/>
<vector id="v2i64" type="int64" count="2"/>
<union id="vec128">
<field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/>
<field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/>
<field name="v4_int32" type="v4i32"/><field name="v2_int64" type="v2i64"/>
<field name="uint128" type="uint128"/>
</union>
<reg name="xmm0" bitsize="128" type="vec128" regnum="40"/>
<reg name="xmm1" bitsize="128" type="vec128"/>
<reg name="xmm2" bitsize="128" type="vec128"/>
<reg name="xmm3" bitsize="128" type="vec128"/>
<reg name="xmm4" bitsize="128" type="vec128"/>
<reg name="xmm5" bitsize="128" type="vec128"/>
<reg name="xmm6" bitsize="128" type="vec128"/>
<reg name="xmm7" bitsize="128" type="vec128"/>
<reg name="xmm8" bitsize="128" type="vec128"/>
<reg name="xmm9" bitsize="128" type="vec128"/>
<reg name="xmm10" bitsize="128" type="vec128"/>
<reg name="xmm11" bitsize="128" type="vec128"/>
<reg name="xmm12" bitsize="128" type="vec128"/>
<reg name="xmm13" bitsize="128" type="vec128"/>
<reg name="xmm14" bitsize="128" type="vec128"/>
<reg name="xmm15" bitsize="128" type="vec128"/>
<reg name="mxcsr" bitsize="32" type="int" group="vector"/>
</feature>
<feature name="org.gnu.gdb.i386.segments">
<reg name="fs_base" bitsize="64" type="int"/>
<reg name="gs_base" bitsize="64" type="int"/>
</feature>
</target>
"#;

// ---- the target ---------------------------------------------------------

/// The hardware breakpoints and watchpoints a debugger may set at once:
/// what the x86 debug registers allow (DR0-DR3), on every engine alike.
pub const HW_SLOTS: usize = 4;

/// The VM as gdb's target.
struct DebugTarget<'a> {
    vm: &'a mut Vm,
    stats: &'a mut Stats,
    /// Breakpoints and watchpoints (`single_step` is set per resume).
    debug: GuestDebug,
    step: bool,
    /// The guest's end, once it came.
    finished: Option<Outcome>,
}

impl<'a> DebugTarget<'a> {
    fn new(vm: &'a mut Vm, stats: &'a mut Stats) -> DebugTarget<'a> {
        // The guest starts stopped, its time standing (where the engine's
        // time can stand).
        if vm.engine.time_stands_when_stopped() {
            vm.clock.pause();
        }
        DebugTarget {
            vm,
            stats,
            debug: GuestDebug::default(),
            step: false,
            finished: None,
        }
    }

    /// Runs the guest's time on before a run: the devices' clock goes on
    /// from where it stood, and the engine takes the time stood out of its
    /// own (the TSC, the local APIC timer, the PIT of the software engines).
    fn time_runs(&mut self) {
        let stood = self.vm.clock.resume();
        self.vm.vcpu.time_paused(stood);
    }

    /// Stops the guest's time after a run, where the engine's time can
    /// stand ([`crate::Engine::time_stands_when_stopped`]).
    fn time_stands(&mut self) {
        if self.vm.engine.time_stands_when_stopped() {
            self.vm.clock.pause();
        }
    }

    fn engine_err(&self, e: impl std::fmt::Display) -> String {
        format!("engine {}: {e}", self.vm.engine)
    }

    /// An engine failure while serving a packet: fatal to the session.
    fn fatal(&self, e: impl std::fmt::Display) -> TargetError<String> {
        TargetError::Fatal(self.engine_err(e))
    }

    /// Guest-physical address of guest-virtual `va` through the guest's
    /// current paging mode and tables.
    fn translate(&self, va: u64) -> Option<u64> {
        let s = self.vm.vcpu.sregs().ok()?;
        machine::paging::translate_current(&self.vm.mem, s.cr0, s.cr3, s.cr4, s.efer, va)
    }

    fn hw_used(&self) -> usize {
        self.debug.hw_breakpoints.len() + self.debug.watchpoints.len()
    }

    /// Takes `new` as the breakpoints and watchpoints if the engine can
    /// (`kvm` has four debug registers for all); false if not.
    fn try_debug(&mut self, new: GuestDebug) -> bool {
        if self.vm.vcpu.set_guest_debug(&new).is_err() {
            return false;
        }
        self.debug = new;
        true
    }

    /// Runs the guest until a debug event, the end of the guest, or bytes
    /// from the client (`fd` readable).
    fn run_guest(&mut self, fd: RawFd) -> Result<Ran, String> {
        let mut d = self.debug.clone();
        d.single_step = self.step;
        self.vm
            .vcpu
            .set_guest_debug(&d)
            .map_err(|e| self.engine_err(e))?;
        self.time_runs();
        let pauser = self.vm.pauser();
        let done = AtomicBool::new(false);
        let (out, data) = std::thread::scope(|s| {
            let watcher = s.spawn(|| watch_fd(fd, &done, &pauser));
            let out = self.vm.run(self.stats);
            done.store(true, Ordering::SeqCst);
            (out, watcher.join().unwrap_or(false))
        });
        pauser.clear();
        self.time_stands();
        let out = out.map_err(|e| self.engine_err(e))?;
        Ok(match out {
            Outcome::Paused => Ran::Data(data),
            Outcome::Debug(DebugEvent::Step) => Ran::Stop(SingleThreadStopReason::DoneStep),
            Outcome::Debug(DebugEvent::Breakpoint) => {
                let rip = self.vm.vcpu.regs().map_err(|e| self.engine_err(e))?.rip;
                Ran::Stop(if self.debug.breakpoints.contains(&rip) {
                    SingleThreadStopReason::SwBreak(())
                } else {
                    SingleThreadStopReason::HwBreak(())
                })
            }
            Outcome::Debug(DebugEvent::Watch { addr, kind }) => {
                Ran::Stop(SingleThreadStopReason::Watch {
                    tid: (),
                    kind: match kind {
                        WatchKind::Write => GdbWatchKind::Write,
                        WatchKind::Read => GdbWatchKind::Read,
                        WatchKind::Access => GdbWatchKind::ReadWrite,
                    },
                    addr,
                })
            }
            o => Ran::Finished(o),
        })
    }

    /// Runs the guest without a debugger until it ends or `pauser` pauses
    /// it (a new client).
    fn run_free(&mut self) -> Result<Option<Outcome>, String> {
        self.vm
            .vcpu
            .set_guest_debug(&GuestDebug::default())
            .map_err(|e| self.engine_err(e))?;
        self.time_runs();
        let out = self.vm.run(self.stats).map_err(|e| self.engine_err(e))?;
        self.time_stands();
        Ok(match out {
            Outcome::Paused | Outcome::Debug(_) => None,
            o => Some(o),
        })
    }
}

/// What a run under the debugger ended with.
enum Ran {
    /// A debug event to report.
    Stop(SingleThreadStopReason<u64>),
    /// Paused: the client sent bytes (if true).
    Data(bool),
    /// The guest ended.
    Finished(Outcome),
}

/// Polls `fd` while the guest runs: readable (or hung up) pauses the VM.
/// True if it did.
fn watch_fd(fd: RawFd, done: &AtomicBool, pauser: &Pauser) -> bool {
    while !done.load(Ordering::SeqCst) {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd on this stack frame, for a descriptor the
        // session owns until this thread is joined.
        let n = unsafe { libc::poll(&mut p, 1, 20) };
        if n > 0 {
            pauser.pause();
            while !done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
                pauser.kick_again();
            }
            return true;
        }
    }
    false
}

impl Target for DebugTarget<'_> {
    type Arch = VisorX86_64;
    type Error = String;

    fn base_ops(&mut self) -> BaseOps<'_, VisorX86_64, String> {
        BaseOps::SingleThread(self)
    }

    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }

    fn support_monitor_cmd(&mut self) -> Option<MonitorCmdOps<'_, Self>> {
        Some(self)
    }
}

/// gdb's general-register order in visor's [`vcpu::Regs`].
fn gpr_mut(r: &mut vcpu::Regs, i: u8) -> Option<&mut u64> {
    Some(match i {
        0 => &mut r.rax,
        1 => &mut r.rbx,
        2 => &mut r.rcx,
        3 => &mut r.rdx,
        4 => &mut r.rsi,
        5 => &mut r.rdi,
        6 => &mut r.rbp,
        7 => &mut r.rsp,
        8 => &mut r.r8,
        9 => &mut r.r9,
        10 => &mut r.r10,
        11 => &mut r.r11,
        12 => &mut r.r12,
        13 => &mut r.r13,
        14 => &mut r.r14,
        15 => &mut r.r15,
        _ => return None,
    })
}

fn seg_mut(s: &mut vcpu::SRegs, i: u8) -> Option<&mut vcpu::Segment> {
    Some(match i {
        0 => &mut s.cs,
        1 => &mut s.ss,
        2 => &mut s.ds,
        3 => &mut s.es,
        4 => &mut s.fs,
        5 => &mut s.gs,
        _ => return None,
    })
}

impl SingleThreadBase for DebugTarget<'_> {
    fn read_registers(&mut self, regs: &mut GdbRegs) -> TargetResult<(), Self> {
        let mut r = self.vm.vcpu.regs().map_err(|e| self.fatal(e))?;
        let mut s = self.vm.vcpu.sregs().map_err(|e| self.fatal(e))?;
        for i in 0..16 {
            regs.gpr[i as usize] = *gpr_mut(&mut r, i).expect("16 registers");
        }
        regs.rip = r.rip;
        regs.eflags = r.rflags as u32;
        for i in 0..6 {
            regs.seg[i as usize] = seg_mut(&mut s, i).expect("6 segments").selector as u32;
        }
        regs.fs_base = s.fs.base;
        regs.gs_base = s.gs.base;
        Ok(())
    }

    fn write_registers(&mut self, regs: &GdbRegs) -> TargetResult<(), Self> {
        let mut r = self.vm.vcpu.regs().map_err(|e| self.fatal(e))?;
        let mut s = self.vm.vcpu.sregs().map_err(|e| self.fatal(e))?;
        for i in 0..16 {
            *gpr_mut(&mut r, i).expect("16 registers") = regs.gpr[i as usize];
        }
        r.rip = regs.rip;
        r.rflags = (r.rflags & !0xffff_ffff) | regs.eflags as u64;
        // Every changed selector is loaded (its descriptor checked) before
        // anything is set: a bad one leaves the whole state as it was.
        let old = s;
        for i in 0..6 {
            let sel = u16::try_from(regs.seg[i as usize]).map_err(|_| TargetError::Errno(22))?;
            if sel != seg_mut(&mut s, i).expect("6 segments").selector {
                let read = |va: u64| {
                    let mut raw = [0u8; 8];
                    self.read_linear(va, &mut raw)
                        .map(|()| u64::from_le_bytes(raw))
                };
                let seg =
                    load_segment(i, sel, &old, r.rflags, read).ok_or(TargetError::Errno(22))?;
                *seg_mut(&mut s, i).expect("6 segments") = seg;
            }
        }
        // A base gdb changed goes over the one a selector load gave.
        if regs.fs_base != old.fs.base {
            s.fs.base = regs.fs_base;
        }
        if regs.gs_base != old.gs.base {
            s.gs.base = regs.gs_base;
        }
        self.set_state(&r, &s)
    }

    fn support_single_register_access(&mut self) -> Option<SingleRegisterAccessOps<'_, (), Self>> {
        Some(self)
    }

    fn read_addrs(&mut self, start: u64, data: &mut [u8]) -> TargetResult<usize, Self> {
        let mut done = 0;
        while done < data.len() {
            let Some(va) = start.checked_add(done as u64) else {
                break;
            };
            let chunk = (0x1000 - (va & 0xfff) as usize).min(data.len() - done);
            if self
                .read_linear(va, &mut data[done..done + chunk])
                .is_none()
            {
                break;
            }
            done += chunk;
        }
        if done == 0 && !data.is_empty() {
            // EFAULT: nothing there.
            return Err(TargetError::Errno(14));
        }
        Ok(done)
    }

    fn write_addrs(&mut self, start: u64, data: &[u8]) -> TargetResult<(), Self> {
        let mut done = 0;
        while done < data.len() {
            let va = start
                .checked_add(done as u64)
                .ok_or(TargetError::Errno(14))?;
            let chunk = (0x1000 - (va & 0xfff) as usize).min(data.len() - done);
            let pa = self.translate(va).ok_or(TargetError::Errno(14))?;
            self.vm
                .write_memory(pa, &data[done..done + chunk])
                .map_err(|_| TargetError::Errno(14))?;
            done += chunk;
        }
        Ok(())
    }

    fn support_resume(&mut self) -> Option<SingleThreadResumeOps<'_, Self>> {
        Some(self)
    }
}

impl DebugTarget<'_> {
    /// All of `buf` from guest-virtual `va`, or `None`.
    fn read_linear(&self, va: u64, buf: &mut [u8]) -> Option<()> {
        let mut done = 0;
        while done < buf.len() {
            let at = va.checked_add(done as u64)?;
            let chunk = (0x1000 - (at & 0xfff) as usize).min(buf.len() - done);
            let pa = self.translate(at)?;
            vm_memory::Bytes::read_slice(
                &self.vm.mem,
                &mut buf[done..done + chunk],
                vm_memory::GuestAddress(pa),
            )
            .ok()?;
            done += chunk;
        }
        Some(())
    }

    fn set_state(&mut self, r: &vcpu::Regs, s: &vcpu::SRegs) -> TargetResult<(), Self> {
        let old = self.vm.vcpu.sregs().map_err(|e| self.fatal(e))?;
        if *s != old {
            self.vm
                .vcpu
                .set_sregs(s)
                .map_err(|_| TargetError::Errno(22))?;
        }
        self.vm.vcpu.set_regs(r).map_err(|_| TargetError::Errno(22))
    }
}

/// Segment register `i` (gdb's order: CS, SS, DS, ES, FS, GS) as loading
/// `sel` makes it in the state `s` with RFLAGS `rflags`, as the guest's
/// own load would (QEMU's stub loads a written selector too): in real
/// mode the base becomes `sel << 4` and the limit and attributes stay
/// (as MOV and a far JMP leave them); in virtual-8086 mode the segment is
/// that of any load there (limit 0xffff, a DPL 3 data segment); in
/// protected and long mode the descriptor is read from the GDT or LDT
/// through guest memory and checked as MOV checks it for SS/DS/ES/FS/GS
/// and as a far JMP (no privilege change) for CS. A null selector empties
/// DS/ES/FS/GS (base 0, as an Intel CPU's and visor's software CPU's
/// load leaves it, FS and GS in 64-bit mode too) and SS only in 64-bit
/// mode at CPL 0-2 with RPL = CPL. `None` where the load would fault:
/// out of the table's limit, no LDT, a descriptor unreadable, of the
/// wrong type or privilege, or not present. Guest memory is not written
/// (the descriptor is not marked accessed, the register's copy is).
/// `read` gives the 8 bytes at a guest-virtual address.
fn load_segment(
    i: u8,
    sel: u16,
    s: &vcpu::SRegs,
    rflags: u64,
    read: impl Fn(u64) -> Option<u64>,
) -> Option<vcpu::Segment> {
    const CS: u8 = 0;
    const SS: u8 = 1;
    let cur = *seg_mut(&mut s.clone(), i)?;
    let base = (sel as u64) << 4;
    if s.cr0 & arch::cr0::PE == 0 {
        return Some(vcpu::Segment {
            selector: sel,
            base,
            ..cur
        });
    }
    if rflags & arch::rflags::VM != 0 {
        return Some(vcpu::Segment {
            selector: sel,
            base,
            limit: 0xffff,
            type_: 3,
            present: true,
            dpl: 3,
            s: true,
            ..Default::default()
        });
    }
    let cpl = s.cs.dpl;
    let ia32e = s.efer & arch::efer::LMA != 0;
    if sel & !3 == 0 {
        let null = vcpu::Segment {
            selector: sel,
            unusable: true,
            ..Default::default()
        };
        return match i {
            CS => None,
            SS if !(ia32e && s.cs.l && cpl < 3 && (sel & 3) as u8 == cpl) => None,
            SS => Some(vcpu::Segment { dpl: cpl, ..null }),
            _ => Some(null),
        };
    }
    let (table, limit) = if sel & 4 != 0 {
        if s.ldt.unusable || !s.ldt.present {
            return None;
        }
        (s.ldt.base, s.ldt.limit as u64)
    } else {
        (s.gdt.base, s.gdt.limit as u64)
    };
    let at = (sel & !7) as u64;
    if at + 7 > limit {
        return None;
    }
    let addr = table.wrapping_add(at);
    if !ia32e && addr > 0xffff_fff8 {
        return None; // no wrap of a legacy linear address
    }
    let raw = read(addr)?;
    let loaded = match i {
        CS => arch::desc::code_segment_jump(sel, raw, cpl, ia32e),
        _ => arch::desc::data_segment_load(sel, raw, i == SS, cpl),
    };
    loaded.ok()
}

impl SingleRegisterAccess<()> for DebugTarget<'_> {
    fn read_register(&mut self, _: (), id: GdbRegId, buf: &mut [u8]) -> TargetResult<usize, Self> {
        let mut regs = GdbRegs::default();
        self.read_registers(&mut regs)?;
        let (v, n) = match id {
            GdbRegId::Gpr(i) => (regs.gpr[i as usize], 8),
            GdbRegId::Rip => (regs.rip, 8),
            GdbRegId::Eflags => (regs.eflags as u64, 4),
            GdbRegId::Seg(i) => (regs.seg[i as usize] as u64, 4),
            GdbRegId::FsBase => (regs.fs_base, 8),
            GdbRegId::GsBase => (regs.gs_base, 8),
            GdbRegId::FpuSse => return Ok(0),
        };
        let n = n.min(buf.len());
        buf[..n].copy_from_slice(&v.to_le_bytes()[..n]);
        Ok(n)
    }

    fn write_register(&mut self, _: (), id: GdbRegId, val: &[u8]) -> TargetResult<(), Self> {
        let mut b = [0u8; 8];
        let n = val.len().min(8);
        b[..n].copy_from_slice(&val[..n]);
        let v = u64::from_le_bytes(b);
        let mut regs = GdbRegs::default();
        self.read_registers(&mut regs)?;
        match id {
            GdbRegId::Gpr(i) => regs.gpr[i as usize] = v,
            GdbRegId::Rip => regs.rip = v,
            GdbRegId::Eflags => regs.eflags = v as u32,
            GdbRegId::Seg(i) => regs.seg[i as usize] = v as u32,
            GdbRegId::FsBase => regs.fs_base = v,
            GdbRegId::GsBase => regs.gs_base = v,
            GdbRegId::FpuSse => return Err(TargetError::Errno(22)),
        }
        self.write_registers(&regs)
    }
}

impl SingleThreadResume for DebugTarget<'_> {
    fn resume(&mut self, signal: Option<Signal>) -> Result<(), String> {
        let _ = signal; // a guest has no signals to deliver
        self.step = false;
        Ok(())
    }

    fn support_single_step(&mut self) -> Option<SingleThreadSingleStepOps<'_, Self>> {
        Some(self)
    }
}

impl SingleThreadSingleStep for DebugTarget<'_> {
    fn step(&mut self, signal: Option<Signal>) -> Result<(), String> {
        let _ = signal;
        self.step = true;
        Ok(())
    }
}

impl Breakpoints for DebugTarget<'_> {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_breakpoint(&mut self) -> Option<HwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_watchpoint(&mut self) -> Option<HwWatchpointOps<'_, Self>> {
        Some(self)
    }
}

impl SwBreakpoint for DebugTarget<'_> {
    fn add_sw_breakpoint(&mut self, addr: u64, _: usize) -> TargetResult<bool, Self> {
        if self.debug.breakpoints.contains(&addr) {
            return Ok(true);
        }
        let mut new = self.debug.clone();
        new.breakpoints.push(addr);
        Ok(self.try_debug(new))
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _: usize) -> TargetResult<bool, Self> {
        let before = self.debug.breakpoints.len();
        self.debug.breakpoints.retain(|&a| a != addr);
        Ok(self.debug.breakpoints.len() != before)
    }
}

impl HwBreakpoint for DebugTarget<'_> {
    fn add_hw_breakpoint(&mut self, addr: u64, _: usize) -> TargetResult<bool, Self> {
        if self.debug.hw_breakpoints.contains(&addr) {
            return Ok(true);
        }
        if self.hw_used() >= HW_SLOTS {
            return Ok(false);
        }
        let mut new = self.debug.clone();
        new.hw_breakpoints.push(addr);
        Ok(self.try_debug(new))
    }

    fn remove_hw_breakpoint(&mut self, addr: u64, _: usize) -> TargetResult<bool, Self> {
        let before = self.debug.hw_breakpoints.len();
        self.debug.hw_breakpoints.retain(|&a| a != addr);
        Ok(self.debug.hw_breakpoints.len() != before)
    }
}

fn watch_kind(k: GdbWatchKind) -> WatchKind {
    match k {
        GdbWatchKind::Write => WatchKind::Write,
        GdbWatchKind::Read => WatchKind::Read,
        GdbWatchKind::ReadWrite => WatchKind::Access,
    }
}

impl HwWatchpoint for DebugTarget<'_> {
    fn add_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: GdbWatchKind,
    ) -> TargetResult<bool, Self> {
        // Any length on the software CPU; the engine says what it can.
        if len == 0 || self.hw_used() >= HW_SLOTS {
            return Ok(false);
        }
        let mut new = self.debug.clone();
        new.watchpoints.push(Watchpoint {
            addr,
            len,
            kind: watch_kind(kind),
        });
        Ok(self.try_debug(new))
    }

    fn remove_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: GdbWatchKind,
    ) -> TargetResult<bool, Self> {
        let w = Watchpoint {
            addr,
            len,
            kind: watch_kind(kind),
        };
        match self.debug.watchpoints.iter().position(|x| *x == w) {
            Some(i) => {
                self.debug.watchpoints.remove(i);
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

/// The monitor commands and what each shows.
const MONITOR_HELP: &[(&str, &str)] = &[
    ("help", "this list"),
    (
        "stats",
        "the run's counters so far (exits, hypercalls, engine counters)",
    ),
    (
        "regs",
        "control registers, EFER, GDTR/IDTR/TR/LDTR, segments, APIC state",
    ),
    (
        "vmcs",
        "engine vmx: the VMCS, decoded by area (as --dump-vmcs)",
    ),
    (
        "virt",
        "engines trap and pv: virtual CPL and IF, shadow paging, holes",
    ),
    (
        "translation",
        "engine bt: the current block's guest code and its host code",
    ),
];

impl MonitorCmd for DebugTarget<'_> {
    fn handle_monitor_cmd(&mut self, cmd: &[u8], mut out: ConsoleOutput<'_>) -> Result<(), String> {
        let cmd = String::from_utf8_lossy(cmd);
        let cmd = cmd.trim();
        match cmd {
            "" | "help" => {
                outputln!(out, "visor monitor commands (engine {}):", self.vm.engine);
                for (c, what) in MONITOR_HELP {
                    outputln!(out, "  {c:<12} {what}");
                }
            }
            "stats" => {
                self.stats.engine_counters = self.vm.vcpu.engine_counters();
                for l in self.stats.table().lines() {
                    outputln!(out, "{l}");
                }
            }
            "regs" => {
                match self.vm.vcpu.sregs() {
                    Ok(s) => {
                        for l in s.to_string().lines() {
                            outputln!(out, "{l}");
                        }
                        for (name, sg) in
                            [("es", &s.es), ("fs", &s.fs), ("gs", &s.gs), ("ldt", &s.ldt)]
                        {
                            outputln!(
                                out,
                                "{name}={:04x} base={:016x} limit={:08x} type={:x} dpl={}",
                                sg.selector,
                                sg.base,
                                sg.limit,
                                sg.type_,
                                sg.dpl
                            );
                        }
                        outputln!(out, "cr8={:x}", s.cr8);
                    }
                    Err(e) => outputln!(out, "error: {e}"),
                }
                match self.vm.vcpu.debug_info("apic") {
                    Some(a) => {
                        for l in a.lines() {
                            outputln!(out, "{l}");
                        }
                    }
                    None => outputln!(out, "apic: not modelled by the engine here"),
                }
            }
            "vmcs" | "virt" | "translation" => match self.vm.vcpu.debug_info(cmd) {
                Some(text) => {
                    for l in text.lines() {
                        outputln!(out, "{l}");
                    }
                }
                None => {
                    let which = match cmd {
                        "vmcs" => "vmx",
                        "virt" => "trap and pv",
                        _ => "bt",
                    };
                    outputln!(
                        out,
                        "`{cmd}` is for engine {which}; this is engine {}",
                        self.vm.engine
                    );
                }
            },
            other => {
                outputln!(
                    out,
                    "unknown monitor command {other:?}; `monitor help` lists them"
                );
            }
        }
        Ok(())
    }
}

// ---- the session loop ---------------------------------------------------

/// How a session with one client ended.
enum SessionEnd {
    /// The guest ended (its outcome).
    Finished(Outcome),
    /// The client asked to kill the guest.
    Killed,
    /// The client went away (detached or disconnected): the guest runs on.
    Gone,
}

/// Serves gdb on `listener` for `vm`, which has not run yet: the guest
/// starts stopped and waits for the first client. Returns how the run
/// ended (the debugger's `kill` ends it as [`Outcome::Killed`]).
pub fn serve(vm: &mut Vm, stats: &mut Stats, listener: Listener) -> Result<Outcome, String> {
    vm.vcpu
        .set_guest_debug(&GuestDebug::default())
        .map_err(|e| format!("--gdb: engine {}: {e}", vm.engine))?;
    eprintln!(
        "visor: waiting for gdb on {} (engine {}; the guest starts when gdb continues)",
        listener.describe(),
        vm.engine
    );
    let _socket = SocketFile(match &listener {
        Listener::Unix(_, p) => Some(p.clone()),
        Listener::Tcp(_) => None,
    });
    let listener = Arc::new(listener);
    // No client yet: the first one to connect is taken, however soon after
    // the accept thread starts.
    let busy = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel::<Stream>();
    let pauser = vm.pauser();
    {
        let (listener, busy, pauser) = (listener.clone(), busy.clone(), pauser.clone());
        std::thread::spawn(move || accept_loop(&listener, &busy, &pauser, tx));
    }
    let mut target = DebugTarget::new(vm, stats);
    let mut next = rx.recv().ok();
    loop {
        let stream = match next.take() {
            Some(s) => s,
            None => {
                // No client: the guest runs until it ends or one connects.
                if let Some(o) = target.run_free()? {
                    return Ok(o);
                }
                pauser.clear();
                match rx.try_recv() {
                    Ok(s) => s,
                    Err(_) => continue,
                }
            }
        };
        eprintln!("visor: gdb connected");
        let end = session(&mut target, stream);
        busy.store(false, Ordering::SeqCst);
        match end? {
            SessionEnd::Finished(o) => return Ok(o),
            SessionEnd::Killed => return Ok(Outcome::Killed),
            SessionEnd::Gone => {
                eprintln!("visor: gdb went away; the guest runs on");
                target.debug = GuestDebug::default();
                target.step = false;
                next = rx.try_recv().ok();
            }
        }
    }
}

/// Accepts clients: the first while none is connected goes to the session
/// loop (and pauses a guest running without one); the others are closed.
fn accept_loop(listener: &Listener, busy: &AtomicBool, pauser: &Pauser, tx: mpsc::Sender<Stream>) {
    loop {
        let Ok(s) = listener.accept() else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        if busy.swap(true, Ordering::SeqCst) {
            eprintln!("visor: refused a second gdb client (one is connected)");
            drop(s);
            continue;
        }
        if tx.send(s).is_err() {
            return;
        }
        pauser.pause();
        while pauser.pending() {
            std::thread::sleep(Duration::from_millis(20));
            pauser.kick_again();
        }
    }
}

type Machine<'b> = GdbStubStateMachine<'static, DebugTarget<'b>, Conn>;

fn new_stub<'b>(target: &mut DebugTarget<'b>, stream: &Stream) -> Result<Machine<'b>, String> {
    let conn = Conn {
        stream: stream
            .try_clone()
            .map_err(|e| format!("gdb connection: {e}"))?,
        out: Vec::new(),
    };
    let stub = GdbStub::<DebugTarget<'b>, Conn>::builder(conn)
        .packet_buffer_size(PACKET_MAX + 16)
        .build()
        .map_err(|e| format!("gdb stub: {e}"))?;
    stub.run_state_machine(target)
        .map_err(|e| format!("gdb stub: {e}"))
}

/// One client's session.
fn session(target: &mut DebugTarget<'_>, mut stream: Stream) -> Result<SessionEnd, String> {
    let fd = stream.fd();
    let mut framer = Framer::default();
    let mut sm = new_stub(target, &stream)?;
    let mut buf = [0u8; 4096];
    let mut pending: std::collections::VecDeque<u8> = Default::default();
    loop {
        sm = match sm {
            GdbStubStateMachine::Disconnected(g) => {
                return Ok(match g.get_reason() {
                    DisconnectReason::TargetExited(_) | DisconnectReason::TargetTerminated(_) => {
                        SessionEnd::Finished(
                            target
                                .finished
                                .take()
                                .ok_or("gdb stub: the guest ended twice")?,
                        )
                    }
                    DisconnectReason::Kill => SessionEnd::Killed,
                    DisconnectReason::Disconnect => SessionEnd::Gone,
                });
            }
            GdbStubStateMachine::CtrlCInterrupt(g) => {
                let stop = Some(SingleThreadStopReason::Signal(Signal::SIGINT));
                match g.interrupt_handled(target, stop) {
                    Ok(s) => s,
                    Err(_) => return Ok(SessionEnd::Gone),
                }
            }
            GdbStubStateMachine::Running(mut g) if pending.is_empty() => {
                // The ack of the resuming packet goes out first.
                if g.borrow_conn().flush().is_err() {
                    return Ok(SessionEnd::Gone);
                }
                let ran = target.run_guest(fd)?;
                match ran {
                    Ran::Stop(reason) => match g.report_stop(target, reason) {
                        Ok(s) => s,
                        Err(_) => return Ok(SessionEnd::Gone),
                    },
                    Ran::Finished(o) => {
                        let reason = match &o {
                            Outcome::Stopped(_) | Outcome::Halted { .. } => {
                                SingleThreadStopReason::Exited(o.exit_status() as u8)
                            }
                            Outcome::Unimplemented { .. } => {
                                SingleThreadStopReason::Terminated(Signal::SIGILL)
                            }
                            Outcome::TimedOut { .. } => {
                                SingleThreadStopReason::Terminated(Signal::SIGKILL)
                            }
                            _ => SingleThreadStopReason::Terminated(Signal::SIGSEGV),
                        };
                        eprintln!("\r\nvisor: {}", o.describe());
                        target.finished = Some(o);
                        match g.report_stop(target, reason) {
                            Ok(s) => s,
                            Err(_) => {
                                return Ok(SessionEnd::Finished(
                                    target.finished.take().expect("set"),
                                ))
                            }
                        }
                    }
                    Ran::Data(false) => GdbStubStateMachine::Running(g),
                    Ran::Data(true) => {
                        if !read_more(&mut stream, &mut buf, &mut framer, &mut pending) {
                            return Ok(SessionEnd::Gone);
                        }
                        GdbStubStateMachine::Running(g)
                    }
                }
            }

            GdbStubStateMachine::Idle(g) if pending.is_empty() => {
                if !read_more(&mut stream, &mut buf, &mut framer, &mut pending) {
                    return Ok(SessionEnd::Gone);
                }
                GdbStubStateMachine::Idle(g)
            }
            GdbStubStateMachine::Idle(g) => {
                let b = pending.pop_front().expect("pending checked");
                recover(
                    g.incoming_data(target, b),
                    target,
                    &mut stream,
                    &mut pending,
                )?
            }
            GdbStubStateMachine::Running(g) => {
                let b = pending.pop_front().expect("pending checked");
                recover(
                    g.incoming_data(target, b),
                    target,
                    &mut stream,
                    &mut pending,
                )?
            }
        };
    }
}

/// The state after a byte went to `gdbstub`; when it could not take the
/// packet, an error reply and a fresh stub (the debug session's state lives
/// in the target, not in the stub).
fn recover<'b>(
    r: Result<Machine<'b>, GdbStubError<String, std::io::Error>>,
    target: &mut DebugTarget<'b>,
    stream: &mut Stream,
    pending: &mut std::collections::VecDeque<u8>,
) -> Result<Machine<'b>, String> {
    match r {
        Ok(s) => Ok(s),
        Err(e) => {
            eprintln!("visor: gdb: bad packet ({e}); answered with an error");
            pending.clear();
            let _ = stream.write_all(&packet("E01"));
            new_stub(target, stream)
        }
    }
}

/// Reads what the client sent and frames it; false if it went away.
fn read_more(
    stream: &mut Stream,
    buf: &mut [u8],
    framer: &mut Framer,
    pending: &mut std::collections::VecDeque<u8>,
) -> bool {
    loop {
        let n = match stream.read(buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        for &b in &buf[..n] {
            match framer.push(b) {
                Some(Frame::Byte(b)) => pending.push_back(b),
                Some(Frame::Packet(p)) => pending.extend(clamp_read(p)),
                Some(Frame::Bad) if stream.write_all(b"-").is_err() => return false,
                Some(Frame::Bad) => {}
                None => {}
            }
        }
        if !pending.is_empty() {
            return true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Segment loads by mode, from a GDT at 0x1000 and an LDT at 0x2000 of
    /// fake memory: real mode and virtual-8086 mode make the base from the
    /// selector; protected mode reads and checks the descriptor; a null
    /// selector is allowed where MOV allows it; what would fault is `None`.
    #[test]
    fn segment_loads_by_mode() {
        use arch::gdt_entry;
        let gdt = [
            0,
            gdt_entry(0xc09b, 0, 0xfffff),         // 0x08: 32-bit code
            gdt_entry(0xa09b, 0, 0xfffff),         // 0x10: 64-bit code
            gdt_entry(0xc093, 0x12_3000, 0xfffff), // 0x18: data
            gdt_entry(0x0082, 0x2000, 0xf),        // 0x20: the LDT
        ];
        let ldt = [gdt_entry(0x40f3, 0x4_0000, 0xffff)]; // 0x07: DPL 3 data
        let read = |va: u64| match va {
            0x1000..=0x1027 if va.is_multiple_of(8) => Some(gdt[(va as usize - 0x1000) / 8]),
            0x2000 => Some(ldt[0]),
            _ => None,
        };
        let flat32 = vcpu::Segment::flat(0x08, true, false, true);
        let mut s = vcpu::SRegs {
            cs: flat32,
            ss: vcpu::Segment::flat(0x18, false, false, true),
            gdt: vcpu::DescriptorTable {
                base: 0x1000,
                limit: 0x27,
            },
            ldt: vcpu::Segment {
                unusable: true,
                ..Default::default()
            },
            cr0: arch::cr0::PE,
            ..Default::default()
        };
        // Real mode: the base from the selector, the rest as it was (here,
        // the flat "unreal" limit stays).
        let real = vcpu::SRegs { cr0: 0, ..s };
        let ds = load_segment(2, 0x1234, &real, 0, read).unwrap();
        assert_eq!((ds.selector, ds.base, ds.limit), (0x1234, 0x12340, 0));
        let cs = load_segment(0, 0xf000, &real, 0, read).unwrap();
        assert_eq!((cs.base, cs.limit, cs.type_), (0xf_0000, 0xffff_ffff, 0xb));
        // Virtual-8086 mode: a DPL 3 16-bit data segment of 64 KiB.
        let es = load_segment(3, 0xb800, &s, arch::rflags::VM, read).unwrap();
        assert_eq!(
            (es.base, es.limit, es.dpl, es.type_),
            (0xb_8000, 0xffff, 3, 3)
        );
        assert!(es.present && es.s && !es.db && !es.unusable);
        // Protected mode: the descriptor, accessed.
        let ds = load_segment(2, 0x18, &s, 0, read).unwrap();
        assert_eq!(
            (ds.base, ds.limit, ds.type_, ds.dpl),
            (0x12_3000, 0xffff_ffff, 3, 0)
        );
        assert_eq!(load_segment(2, 0x28, &s, 0, read), None, "beyond the limit");
        assert_eq!(
            load_segment(2, 0x20, &s, 0, read),
            None,
            "a system descriptor"
        );
        assert_eq!(load_segment(2, 0x07, &s, 0, read), None, "no LDT");
        s.ldt = vcpu::Segment {
            base: 0x2000,
            limit: 7,
            type_: 2,
            present: true,
            ..Default::default()
        };
        let fs = load_segment(4, 0x07, &s, 0, read).unwrap();
        assert_eq!((fs.base, fs.limit, fs.dpl), (0x4_0000, 0xffff, 3));
        assert_eq!(
            load_segment(1, 0x07, &s, 0, read),
            None,
            "SS of DPL 3 at CPL 0"
        );
        // Null: DS yes (unusable, base 0); CS never; SS not outside 64-bit mode.
        let gs = load_segment(5, 0, &s, 0, read).unwrap();
        assert!(gs.unusable && gs.base == 0);
        assert_eq!(load_segment(0, 0, &s, 0, read), None);
        assert_eq!(load_segment(1, 0, &s, 0, read), None);
        // CS: a far JMP's checks; 64-bit code in IA-32e mode.
        let cs = load_segment(0, 0x10, &s, 0, read).unwrap();
        assert!(cs.l && cs.selector == 0x10);
        assert_eq!(load_segment(0, 0x18, &s, 0, read), None, "data as CS");
        let long = vcpu::SRegs {
            cs: vcpu::Segment::flat(0x10, true, true, false),
            efer: arch::efer::LMA | arch::efer::LME,
            ..s
        };
        let ss = load_segment(1, 0, &long, 0, read).unwrap();
        assert!(ss.unusable && ss.dpl == 0);
        assert_eq!(
            load_segment(1, 3, &long, 0, read),
            None,
            "RPL is not the CPL"
        );
        // An unreadable table is no descriptor.
        assert_eq!(load_segment(2, 0x18, &s, 0, |_| None), None);
    }

    /// A long memory read is cut to what one reply holds; others pass.
    #[test]
    fn long_reads_are_clamped() {
        assert_eq!(
            clamp_read(packet("m0,ffffffffffffffff")),
            packet(&format!("m0,{READ_MAX:x}"))
        );
        for p in ["m200000,4", "m0,800", "g", "m zz", "mfff,zz"] {
            assert_eq!(clamp_read(packet(p)), packet(p));
        }
    }

    #[test]
    fn addresses() {
        assert_eq!(
            parse_addr("1234"),
            Ok(GdbAddr::Tcp("127.0.0.1:1234".parse().unwrap()))
        );
        assert_eq!(
            parse_addr("0.0.0.0:99"),
            Ok(GdbAddr::Tcp("0.0.0.0:99".parse().unwrap()))
        );
        assert_eq!(
            parse_addr("[::1]:7"),
            Ok(GdbAddr::Tcp("[::1]:7".parse().unwrap()))
        );
        assert_eq!(
            parse_addr("/tmp/g.sock"),
            Ok(GdbAddr::Unix("/tmp/g.sock".into()))
        );
        for bad in ["", "x", "70000", ":", "host:", "1.2.3.4:port", "-1"] {
            assert!(parse_addr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn framing() {
        let mut f = Framer::default();
        let feed = |f: &mut Framer, s: &[u8]| -> Vec<Frame> {
            s.iter().filter_map(|&b| f.push(b)).collect()
        };
        assert_eq!(feed(&mut f, b"junk+"), vec![Frame::Byte(b'+')]);
        assert_eq!(
            feed(&mut f, b"$g#67"),
            vec![Frame::Packet(b"$g#67".to_vec())]
        );
        assert_eq!(feed(&mut f, b"$g#00"), vec![Frame::Bad]);
        assert_eq!(feed(&mut f, b"$g#zz"), vec![Frame::Bad]);
        assert_eq!(feed(&mut f, &[3]), vec![Frame::Byte(3)]);
        let mut long = vec![b'$'];
        long.extend(std::iter::repeat_n(b'a', PACKET_MAX + 10));
        long.extend(b"#00");
        assert_eq!(feed(&mut f, &long), vec![Frame::Bad]);
        assert_eq!(packet("OK"), b"$OK#9a".to_vec());
    }

    #[test]
    fn register_file_round_trip() {
        let r = GdbRegs {
            gpr: core::array::from_fn(|i| i as u64 * 0x1111),
            rip: 0xffff_8000_0000_1234,
            eflags: 0x246,
            seg: [0x10, 0x18, 0x18, 0x18, 0, 0],
            fs_base: 0x7000,
            gs_base: 0xffff_8880_0000_0000,
        };
        let mut bytes = Vec::new();
        r.gdb_serialize(|b| bytes.push(b.unwrap_or(0)));
        // Every register gdb numbers, in order.
        let total: usize = (0..)
            .map_while(GdbRegId::from_raw_id)
            .map(|(_, n)| n.unwrap().get())
            .sum();
        assert_eq!(bytes.len(), total);
        let mut back = GdbRegs::default();
        back.gdb_deserialize(&bytes).unwrap();
        assert_eq!(back, r);
    }
}
