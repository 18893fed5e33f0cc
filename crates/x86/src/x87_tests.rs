//! Unit tests of FPREM, FPREM1, FBLD, FBSTP and the transcendentals: each
//! instruction runs on the software CPU from a given stack and control word,
//! and its FNSAVE image (FCW, FSW, the tag word, the eight registers) is
//! compared with known values and, on an x86-64 host, with the host's own
//! x87 running the same instruction: bit for bit for the exact instructions,
//! within 1 ulp (C1 aside) for the transcendentals, whose last bit this
//! host's x87 (AMD) may round differently from Intel's and from visor's.

use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress};

use crate::f80::F80;
use crate::tests::{asm, CODE, STACK, T};
use crate::CpuExit;

const DATA: u64 = STACK - 0x1000;

/// The FNSAVE image (108 bytes) after `op` (its encoding) runs with
/// ST(0) = a, ST(1) = b (`b` None: only a loaded) under `fcw`; `bcd`: 10
/// bytes at DATA + 48 (FBLD's source; FBSTP writes there).
fn visor(op: &[u8], fcw: u16, a: F80, b: Option<F80>, bcd: [u8; 10]) -> ([u8; 108], [u8; 10]) {
    let code = asm(64, CODE, |c| {
        c.mov(rbx, DATA)?;
        c.fninit()?;
        c.fldcw(word_ptr(rbx))?;
        if b.is_some() {
            c.fld(tword_ptr(rbx + 16))?;
        }
        c.fld(tword_ptr(rbx + 32))?;
        c.db(op)?;
        c.fnsave(ptr(rbx + 64))?;
        c.hlt()
    });
    let mut t = T::long(&code);
    let m = &t.mem;
    m.write_obj(fcw, GuestAddress(DATA)).unwrap();
    m.write_slice(
        &b.unwrap_or(F80::ZERO).to_bytes()[..10],
        GuestAddress(DATA + 16),
    )
    .unwrap();
    m.write_slice(&a.to_bytes()[..10], GuestAddress(DATA + 32))
        .unwrap();
    m.write_slice(&bcd, GuestAddress(DATA + 48)).unwrap();
    assert_eq!(t.run(), CpuExit::Hlt);
    let mut img = [0u8; 108];
    t.mem.read_slice(&mut img, GuestAddress(DATA + 64)).unwrap();
    let mut out = [0u8; 10];
    t.mem.read_slice(&mut out, GuestAddress(DATA + 48)).unwrap();
    (img, out)
}

fn fsw(img: &[u8; 108]) -> u16 {
    u16::from_le_bytes([img[4], img[5]])
}

/// Register R(k) of the image as (sign and exponent, significand), in
/// stack order from ST(0).
fn st(img: &[u8; 108], k: usize) -> F80 {
    F80::from_bytes(&[&img[28 + 10 * k..38 + 10 * k], &[0u8; 6][..]].concat())
}

fn f(se: u16, sig: u64) -> F80 {
    F80 { se, sig }
}

const ONE: F80 = F80 {
    se: 0x3fff,
    sig: 1 << 63,
};

/// D9 F8 FPREM, D9 F5 FPREM1, D9 FE FSIN, D9 FF FCOS, D9 FB FSINCOS,
/// D9 F2 FPTAN, D9 F3 FPATAN, D9 F0 F2XM1, D9 F1 FYL2X, D9 F9 FYL2XP1.
const FPREM: [u8; 2] = [0xd9, 0xf8];
const FPREM1: [u8; 2] = [0xd9, 0xf5];
const FSIN: [u8; 2] = [0xd9, 0xfe];
const FCOS: [u8; 2] = [0xd9, 0xff];
const FSINCOS: [u8; 2] = [0xd9, 0xfb];
const FPTAN: [u8; 2] = [0xd9, 0xf2];
const FPATAN: [u8; 2] = [0xd9, 0xf3];
const F2XM1: [u8; 2] = [0xd9, 0xf0];
const FYL2X: [u8; 2] = [0xd9, 0xf1];
const FYL2XP1: [u8; 2] = [0xd9, 0xf9];

/// Known results (checked against the exact values).
#[test]
fn x87_known_values() {
    let three = f(0x4000, 0xc000_0000_0000_0000);
    let seven = f(0x4001, 0xe000_0000_0000_0000);
    // 7 rem 3 = 1, quotient 2: C3 (Q1).
    let (img, _) = visor(&FPREM, 0x37f, seven, Some(three), [0; 10]);
    assert_eq!(st(&img, 0), ONE);
    assert_eq!(fsw(&img) & 0x4700, 0x4000);
    // FPREM1: 7 - 2 * 3 = 1 as well; 8 rem1 3 = -1 (quotient 3: C1, C3).
    let eight = f(0x4002, 1 << 63);
    let (img, _) = visor(&FPREM1, 0x37f, eight, Some(three), [0; 10]);
    assert_eq!(st(&img, 0), ONE.neg());
    assert_eq!(fsw(&img) & 0x4700, 0x4200);
    // A partial remainder: C2, the others clear.
    let big = f(0x3fff + 100, 0xd000_0000_0000_0001);
    let (img, _) = visor(&FPREM, 0x37f, big, Some(three), [0; 10]);
    assert_eq!(fsw(&img) & 0x4700, 0x0400);
    assert_eq!(st(&img, 0), f(0x4040, 0x8000_0008_0000_0000));
    // sin(1), cos(1) (rounded up: C1), tan(1) and 1.0 pushed (tan(1) =
    // 0x1.8eb245cbee3a5b8a6...: this host's AMD x87 gives ...2dc6, 1 ulp
    // above).
    let (img, _) = visor(&FSIN, 0x37f, ONE, None, [0; 10]);
    assert_eq!(st(&img, 0), f(0x3ffe, 0xd76a_a478_4867_7021));
    assert_eq!(fsw(&img) & 0x4720, 0x0220);
    let (img, _) = visor(&FCOS, 0x37f, ONE, None, [0; 10]);
    assert_eq!(st(&img, 0), f(0x3ffe, 0x8a51_407d_a834_5c92));
    let (img, _) = visor(&FPTAN, 0x37f, ONE, None, [0; 10]);
    assert_eq!(
        (st(&img, 0), st(&img, 1)),
        (ONE, f(0x3fff, 0xc759_22e5_f71d_2dc5))
    );
    // sin of the 64-bit pi: the 66-bit pi's reduction gives -2^-64.
    let pi = f(0x4000, 0xc90f_daa2_2168_c235);
    let (img, _) = visor(&FSIN, 0x37f, pi, None, [0; 10]);
    assert_eq!(st(&img, 0), f(0xbfbf, 1 << 63));
    // Out of range: C2, unchanged.
    let huge = f(0x3fff + 63, 1 << 63);
    let (img, _) = visor(&FSIN, 0x37f, huge, None, [0; 10]);
    assert_eq!((st(&img, 0), fsw(&img) & 0x4700), (huge, 0x0400));
    // atan(1/1) = pi/4; 2^1 - 1 = 1 exactly; 3 log2(8) = 9 exactly.
    let (img, _) = visor(&FPATAN, 0x37f, ONE, Some(ONE), [0; 10]);
    assert_eq!(st(&img, 0), f(0x3ffe, 0xc90f_daa2_2168_c235));
    let (img, _) = visor(&F2XM1, 0x37f, ONE, None, [0; 10]);
    assert_eq!((st(&img, 0), fsw(&img) & 0x3f), (ONE, 0));
    let (img, _) = visor(&FYL2X, 0x37f, eight, Some(three), [0; 10]);
    assert_eq!(
        (st(&img, 0), fsw(&img) & 0x3f),
        (f(0x4002, 0x9000_0000_0000_0000), 0)
    );
    // log2(0): division by zero, -inf.
    let (img, _) = visor(&FYL2X, 0x37f, F80::ZERO, Some(three), [0; 10]);
    assert_eq!((st(&img, 0), fsw(&img) & 0x3f), (F80::inf(true), 4));
    // FBLD -123456789012345678; FBSTP of -0.3 (nearest): -0 with PE.
    let mut bcd = [0x78, 0x56, 0x34, 0x12, 0x90, 0x78, 0x56, 0x34, 0x12, 0x80];
    let (img, _) = visor(&[0xdf, 0x63, 48], 0x37f, ONE, None, bcd);
    assert_eq!(st(&img, 0), F80::from_i64(-123_456_789_012_345_678));
    let m03 = f(0xbffd, 0x9999_9999_9999_9999);
    let (img, out) = visor(&[0xdf, 0x73, 48], 0x37f, m03, None, bcd);
    assert_eq!(
        (out, fsw(&img) & 0x3f),
        ([0, 0, 0, 0, 0, 0, 0, 0, 0, 0x80], 0x20)
    );
    // 10^18 is out of range: the packed BCD indefinite, IE.
    bcd = [0; 10];
    let e18 = F80::from_i64(1_000_000_000_000_000_000);
    let (img, out) = visor(&[0xdf, 0x73, 48], 0x37f, e18, None, bcd);
    assert_eq!(out, crate::f80x::BCD_INDEFINITE);
    assert_eq!(fsw(&img) & 0x3f, 1);
}

#[cfg(target_arch = "x86_64")]
mod host {
    use super::*;

    /// Runs the same instruction on this host's x87.
    macro_rules! host_op {
        ($name:ident, $ins:literal) => {
            pub(super) fn $name(fcw: u16, a: F80, b: F80, bcd: &mut [u8; 10]) -> [u8; 108] {
                let mut img = [0u8; 108];
                let (ab, bb) = (a.to_bytes(), b.to_bytes());
                // SAFETY: only the x87 state (declared clobbered, and left
                // initialized by FNSAVE) and the locals behind the pointers
                // (valid, and large enough: 2, 10, 10, 10 and 108 bytes)
                // are touched; every exception is masked by `fcw` (the
                // callers' control words have bits 0-5 set).
                unsafe {
                    core::arch::asm!(
                        "mov {t}, {m}",
                        "fninit",
                        "fldcw word ptr [{c}]",
                        "fld tbyte ptr [{b}]",
                        "fld tbyte ptr [{a}]",
                        $ins,
                        "fnsave [{o}]",
                        c = in(reg) &fcw,
                        a = in(reg) ab.as_ptr(),
                        b = in(reg) bb.as_ptr(),
                        m = in(reg) bcd.as_mut_ptr(),
                        o = in(reg) img.as_mut_ptr(),
                        t = out(reg) _,
                        out("st(0)") _, out("st(1)") _, out("st(2)") _, out("st(3)") _,
                        out("st(4)") _, out("st(5)") _, out("st(6)") _, out("st(7)") _,
                        options(nostack),
                    );
                }
                img
            }
        };
    }
    host_op!(fprem, "fprem");
    host_op!(fprem1, "fprem1");
    host_op!(fsin, "fsin");
    host_op!(fcos, "fcos");
    host_op!(fsincos, "fsincos");
    host_op!(fptan, "fptan");
    host_op!(fpatan, "fpatan");
    host_op!(f2xm1, "f2xm1");
    host_op!(fyl2x, "fyl2x");
    host_op!(fyl2xp1, "fyl2xp1");
    host_op!(fbld, "fbld tbyte ptr [{m}]");
    host_op!(fbstp, "fbstp tbyte ptr [{m}]");
}

/// Whether the host's x87 is AMD's, whose choices where the SDM leaves
/// room (the N of partial remainders, FBLD's digits above 9, the condition
/// codes after a NaN operand of FPREM) visor follows: the bit-for-bit tests
/// below compare only there (this project's machines are AMD).
#[cfg(target_arch = "x86_64")]
fn host_is_amd() -> bool {
    let r = core::arch::x86_64::__cpuid(0);
    [r.ebx, r.edx, r.ecx] == [0x6874_7541, 0x6974_6e65, 0x444d_4163]
}

/// A small xorshift generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A normal value with an unbiased exponent in `lo..=hi`, either sign.
    fn normal(&mut self, lo: i32, hi: i32) -> F80 {
        let e = lo + (self.next() % (hi - lo + 1) as u64) as i32;
        let s = (self.next() & 1) as u16;
        f(s << 15 | (16383 + e) as u16, self.next() | 1 << 63)
    }
}

/// Special operands: zeros, denormals, a pseudo-denormal, infinities, NaNs,
/// an unnormal, small integers.
fn specials() -> Vec<F80> {
    vec![
        F80::ZERO,
        F80::ZERO.neg(),
        f(0, 1),
        f(0x8000, 0x4000_0000_0000_0000),
        f(0, 1 << 63),
        F80::inf(false),
        F80::inf(true),
        f(0x7fff, 0xc000_0000_0000_0001),
        f(0xffff, 0x8000_0000_0000_0001),
        f(0x4000, 0x4000_0000_0000_0000),
        ONE,
        ONE.neg(),
        f(0x4000, 0xc000_0000_0000_0000),
        f(0x4001, 0xa000_0000_0000_0000),
    ]
}

/// Compares the images: FCW, FSW (less `fsw_ignore`), the tag word, and
/// the registers, equal or (`ulp`) within one unit in the last place.
#[cfg(target_arch = "x86_64")]
fn same(what: &str, v: &[u8; 108], h: &[u8; 108], ulp: bool, fsw_ignore: u16) {
    let w = |i: &[u8; 108], k: usize| u16::from_le_bytes([i[k], i[k + 1]]);
    let ok_fsw = (w(v, 4) ^ w(h, 4)) & !fsw_ignore == 0;
    // Empty registers (tag 11) hold stale values: not compared.
    let top = (w(v, 4) >> 11) & 7;
    let regs_ok = (0..8).all(|k| {
        let (x, y) = (st(v, k), st(h, k));
        if (w(v, 8) >> (2 * ((top as usize + k) & 7))) & 3 == 3 {
            return true;
        }
        if ulp && x.exp() != 0x7fff && y.exp() != 0x7fff && x.sign() == y.sign() {
            // Adjacent encodings, across a power of two too.
            let next = |z: F80| match z.sig.checked_add(1) {
                Some(s) if z.exp() != 0 || s >> 63 == 0 => (z.se, s),
                Some(_) => (z.se + 1, 1 << 63),
                None => (z.se + 1, 1 << 63),
            };
            x == y || next(x) == (y.se, y.sig) || next(y) == (x.se, x.sig)
        } else {
            x == y
        }
    });
    assert!(
        w(v, 0) == w(h, 0) && ok_fsw && w(v, 8) == w(h, 8) && regs_ok,
        "{what}: visor fsw {:#06x} tag {:#06x} {:x?}\nhost  fsw {:#06x} tag {:#06x} {:x?}",
        w(v, 4),
        w(v, 8),
        (0..8).map(|k| st(v, k)).collect::<Vec<_>>(),
        w(h, 4),
        w(h, 8),
        (0..8).map(|k| st(h, k)).collect::<Vec<_>>(),
    );
}

/// FPREM and FPREM1 against the host, bit for bit: random operands with
/// exponent differences from -3 to 200 (partial remainders), the special
/// operands, each rounding control.
#[cfg(target_arch = "x86_64")]
#[test]
fn x87_fprem_matches_host() {
    if !host_is_amd() {
        eprintln!("x87_fprem_matches_host: not an AMD host, not compared");
        return;
    }
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut cases = Vec::new();
    for a in specials() {
        for b in specials() {
            cases.push((a, b));
        }
    }
    for _ in 0..150 {
        let b = rng.normal(-20, 20);
        let d = (rng.next() % 204) as i32 - 3;
        let a = rng.normal(b.exp() as i32 - 16383 + d, b.exp() as i32 - 16383 + d);
        cases.push((a, b));
    }
    // Denormal results: a tiny divisor.
    cases.push((
        f(0x0005, 0xdead_beef_0000_0001),
        f(0x0001, 0x8000_0000_0000_0003),
    ));
    for (n, (a, b)) in cases.into_iter().enumerate() {
        let fcw = 0x37f | ((n as u16 % 4) << 10);
        for (op, h) in [
            (
                FPREM,
                host::fprem as fn(u16, F80, F80, &mut [u8; 10]) -> [u8; 108],
            ),
            (FPREM1, host::fprem1),
        ] {
            let (v, _) = visor(&op, fcw, a, Some(b), [0; 10]);
            let hi = h(fcw, a, b, &mut [0; 10]);
            same(&format!("{op:x?} {a:x?} {b:x?}"), &v, &hi, false, 0);
        }
    }
}

/// FBLD and FBSTP against the host, bit for bit: digits 0-9 and the
/// undefined A-F, signs; integers, fractions per rounding control, values
/// beyond 18 digits, specials.
#[cfg(target_arch = "x86_64")]
#[test]
fn x87_bcd_matches_host() {
    if !host_is_amd() {
        eprintln!("x87_bcd_matches_host: not an AMD host, not compared");
        return;
    }
    let mut rng = Rng(0x0bcd_0bcd_1234_5678);
    for n in 0..60 {
        let mut bcd = [0u8; 10];
        for b in bcd.iter_mut() {
            *b = rng.next() as u8;
            if n % 2 == 0 {
                *b = (*b >> 4) % 10 * 16 + (*b & 15) % 10;
            }
        }
        let (v, _) = visor(&[0xdf, 0x63, 48], 0x37f, ONE, None, bcd);
        let h = host::fbld(0x37f, ONE, ONE, &mut bcd.clone());
        // The host's image has ST(1) = 1.0 loaded too: compare ST(0).
        assert_eq!(st(&v, 0), st(&h, 0), "FBLD {bcd:x?}");
    }
    let mut vals = specials();
    for _ in 0..80 {
        vals.push(rng.normal(-3, 64));
    }
    vals.push(F80::from_i64(999_999_999_999_999_999));
    vals.push(F80::from_i64(-999_999_999_999_999_999));
    vals.push(F80::from_i64(1_000_000_000_000_000_000));
    for (n, a) in vals.into_iter().enumerate() {
        let fcw = 0x37f | ((n as u16 % 4) << 10);
        let (v, vo) = visor(&[0xdf, 0x73, 48], fcw, a, Some(ONE), [0; 10]);
        let mut ho = [0u8; 10];
        let h = host::fbstp(fcw, a, ONE, &mut ho);
        same(&format!("FBSTP {a:x?} fcw {fcw:#x}"), &v, &h, false, 0);
        assert_eq!(vo, ho, "FBSTP {a:x?} fcw {fcw:#x}");
    }
}

/// The transcendentals against the host, within 1 ulp, with the same
/// exception flags and condition codes (C1, the rounding direction, where
/// the results are the same):
/// random operands in each instruction's domain and the special operands,
/// each rounding control.
#[cfg(target_arch = "x86_64")]
#[test]
fn x87_transcendentals_match_host() {
    type H = fn(u16, F80, F80, &mut [u8; 10]) -> [u8; 108];
    let mut rng = Rng(0x7a4e_5eed_0000_0001);
    let ops: [([u8; 2], H, i32, i32); 8] = [
        (FSIN, host::fsin, -70, 62),
        (FCOS, host::fcos, -70, 62),
        (FSINCOS, host::fsincos, -70, 62),
        (FPTAN, host::fptan, -70, 62),
        (FPATAN, host::fpatan, -200, 200),
        (F2XM1, host::f2xm1, -70, -1),
        (FYL2X, host::fyl2x, -200, 200),
        (FYL2XP1, host::fyl2xp1, -70, -3),
    ];
    for (op, h, lo, hi) in ops {
        let mut cases = Vec::new();
        for a in specials() {
            // F2XM1 and FYL2XP1 beyond their domains are undefined.
            let out = (op == F2XM1 || op == FYL2XP1) && a.exp() >= 0x3fff && a.exp() != 0x7fff;
            if !out {
                cases.push((a, rng.normal(-5, 5)));
            }
        }
        for _ in 0..120 {
            let a = rng.normal(lo, hi);
            let a = if op == FYL2X { a.abs() } else { a };
            cases.push((a, rng.normal(-30, 30)));
        }
        for (n, (a, b)) in cases.into_iter().enumerate() {
            let fcw = 0x37f | ((n as u16 % 4) << 10);
            let (v, _) = visor(&op, fcw, a, Some(b), [0; 10]);
            let hi = h(fcw, a, b, &mut [0; 10]);
            // C1 (rounded up) is compared where the results are the same;
            // not for FPTAN, where this host's C1 for tiny arguments (tan(x)
            // rounded to x) is set against the rounding's direction.
            let c1 = if op == FPTAN || v[28..108] != hi[28..108] {
                0x200
            } else {
                0
            };
            same(
                &format!("{op:x?} {a:x?} {b:x?} fcw {fcw:#x}"),
                &v,
                &hi,
                true,
                c1,
            );
        }
    }
}
