//! The VMCS fields the software CPU supports, keyed by their architectural
//! encodings (Intel SDM vol. 3C, appendix B), with names for dumps.
//!
//! An encoding's bits 14:13 give the width (16-bit, 64-bit, 32-bit, natural),
//! bits 11:10 the type (control, read-only data, guest state, host state),
//! bits 9:1 the index and bit 0 the access type (1: the high 32 bits of a
//! 64-bit field).

/// The width of a field (bits 14:13 of its encoding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Width {
    W16,
    W64,
    W32,
    Natural,
}

/// The area of the VMCS a field belongs to (bits 11:10 of its encoding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Area {
    Control,
    ReadOnly,
    Guest,
    Host,
}

impl Area {
    pub const ALL: [Area; 4] = [Area::Control, Area::ReadOnly, Area::Guest, Area::Host];

    pub fn name(self) -> &'static str {
        match self {
            Area::Control => "control fields",
            Area::ReadOnly => "VM-exit information (read-only)",
            Area::Guest => "guest-state area",
            Area::Host => "host-state area",
        }
    }
}

/// The width of the field with encoding `enc`.
pub fn width(enc: u32) -> Width {
    match (enc >> 13) & 3 {
        0 => Width::W16,
        1 => Width::W64,
        2 => Width::W32,
        _ => Width::Natural,
    }
}

/// The area of the field with encoding `enc`.
pub fn area(enc: u32) -> Area {
    match (enc >> 10) & 3 {
        0 => Area::Control,
        1 => Area::ReadOnly,
        2 => Area::Guest,
        _ => Area::Host,
    }
}

macro_rules! fields {
    ($($name:ident = $enc:expr;)*) => {
        $(pub const $name: u32 = $enc;)*
        /// Every supported field, by encoding (ascending), with its name.
        pub const FIELDS: &[(u32, &str)] = &[$(($enc, stringify!($name)),)*];
    };
}

fields! {
    VIRTUAL_PROCESSOR_ID = 0x0000;
    GUEST_ES_SELECTOR = 0x0800;
    GUEST_CS_SELECTOR = 0x0802;
    GUEST_SS_SELECTOR = 0x0804;
    GUEST_DS_SELECTOR = 0x0806;
    GUEST_FS_SELECTOR = 0x0808;
    GUEST_GS_SELECTOR = 0x080a;
    GUEST_LDTR_SELECTOR = 0x080c;
    GUEST_TR_SELECTOR = 0x080e;
    HOST_ES_SELECTOR = 0x0c00;
    HOST_CS_SELECTOR = 0x0c02;
    HOST_SS_SELECTOR = 0x0c04;
    HOST_DS_SELECTOR = 0x0c06;
    HOST_FS_SELECTOR = 0x0c08;
    HOST_GS_SELECTOR = 0x0c0a;
    HOST_TR_SELECTOR = 0x0c0c;
    IO_BITMAP_A = 0x2000;
    IO_BITMAP_B = 0x2002;
    MSR_BITMAP = 0x2004;
    VM_EXIT_MSR_STORE_ADDR = 0x2006;
    VM_EXIT_MSR_LOAD_ADDR = 0x2008;
    VM_ENTRY_MSR_LOAD_ADDR = 0x200a;
    TSC_OFFSET = 0x2010;
    EPT_POINTER = 0x201a;
    GUEST_PHYSICAL_ADDRESS = 0x2400;
    VMCS_LINK_POINTER = 0x2800;
    GUEST_IA32_DEBUGCTL = 0x2802;
    GUEST_IA32_PAT = 0x2804;
    GUEST_IA32_EFER = 0x2806;
    GUEST_PDPTR0 = 0x280a;
    GUEST_PDPTR1 = 0x280c;
    GUEST_PDPTR2 = 0x280e;
    GUEST_PDPTR3 = 0x2810;
    HOST_IA32_PAT = 0x2c00;
    HOST_IA32_EFER = 0x2c02;
    PIN_BASED_VM_EXEC_CONTROL = 0x4000;
    CPU_BASED_VM_EXEC_CONTROL = 0x4002;
    EXCEPTION_BITMAP = 0x4004;
    PAGE_FAULT_ERROR_CODE_MASK = 0x4006;
    PAGE_FAULT_ERROR_CODE_MATCH = 0x4008;
    CR3_TARGET_COUNT = 0x400a;
    VM_EXIT_CONTROLS = 0x400c;
    VM_EXIT_MSR_STORE_COUNT = 0x400e;
    VM_EXIT_MSR_LOAD_COUNT = 0x4010;
    VM_ENTRY_CONTROLS = 0x4012;
    VM_ENTRY_MSR_LOAD_COUNT = 0x4014;
    VM_ENTRY_INTR_INFO_FIELD = 0x4016;
    VM_ENTRY_EXCEPTION_ERROR_CODE = 0x4018;
    VM_ENTRY_INSTRUCTION_LEN = 0x401a;
    TPR_THRESHOLD = 0x401c;
    SECONDARY_VM_EXEC_CONTROL = 0x401e;
    VM_INSTRUCTION_ERROR = 0x4400;
    VM_EXIT_REASON = 0x4402;
    VM_EXIT_INTR_INFO = 0x4404;
    VM_EXIT_INTR_ERROR_CODE = 0x4406;
    IDT_VECTORING_INFO_FIELD = 0x4408;
    IDT_VECTORING_ERROR_CODE = 0x440a;
    VM_EXIT_INSTRUCTION_LEN = 0x440c;
    VMX_INSTRUCTION_INFO = 0x440e;
    GUEST_ES_LIMIT = 0x4800;
    GUEST_CS_LIMIT = 0x4802;
    GUEST_SS_LIMIT = 0x4804;
    GUEST_DS_LIMIT = 0x4806;
    GUEST_FS_LIMIT = 0x4808;
    GUEST_GS_LIMIT = 0x480a;
    GUEST_LDTR_LIMIT = 0x480c;
    GUEST_TR_LIMIT = 0x480e;
    GUEST_GDTR_LIMIT = 0x4810;
    GUEST_IDTR_LIMIT = 0x4812;
    GUEST_ES_AR_BYTES = 0x4814;
    GUEST_CS_AR_BYTES = 0x4816;
    GUEST_SS_AR_BYTES = 0x4818;
    GUEST_DS_AR_BYTES = 0x481a;
    GUEST_FS_AR_BYTES = 0x481c;
    GUEST_GS_AR_BYTES = 0x481e;
    GUEST_LDTR_AR_BYTES = 0x4820;
    GUEST_TR_AR_BYTES = 0x4822;
    GUEST_INTERRUPTIBILITY_INFO = 0x4824;
    GUEST_ACTIVITY_STATE = 0x4826;
    GUEST_SMBASE = 0x4828;
    GUEST_SYSENTER_CS = 0x482a;
    VMX_PREEMPTION_TIMER_VALUE = 0x482e;
    HOST_IA32_SYSENTER_CS = 0x4c00;
    CR0_GUEST_HOST_MASK = 0x6000;
    CR4_GUEST_HOST_MASK = 0x6002;
    CR0_READ_SHADOW = 0x6004;
    CR4_READ_SHADOW = 0x6006;
    CR3_TARGET_VALUE0 = 0x6008;
    CR3_TARGET_VALUE1 = 0x600a;
    CR3_TARGET_VALUE2 = 0x600c;
    CR3_TARGET_VALUE3 = 0x600e;
    EXIT_QUALIFICATION = 0x6400;
    IO_RCX = 0x6402;
    IO_RSI = 0x6404;
    IO_RDI = 0x6406;
    IO_RIP = 0x6408;
    GUEST_LINEAR_ADDRESS = 0x640a;
    GUEST_CR0 = 0x6800;
    GUEST_CR3 = 0x6802;
    GUEST_CR4 = 0x6804;
    GUEST_ES_BASE = 0x6806;
    GUEST_CS_BASE = 0x6808;
    GUEST_SS_BASE = 0x680a;
    GUEST_DS_BASE = 0x680c;
    GUEST_FS_BASE = 0x680e;
    GUEST_GS_BASE = 0x6810;
    GUEST_LDTR_BASE = 0x6812;
    GUEST_TR_BASE = 0x6814;
    GUEST_GDTR_BASE = 0x6816;
    GUEST_IDTR_BASE = 0x6818;
    GUEST_DR7 = 0x681a;
    GUEST_RSP = 0x681c;
    GUEST_RIP = 0x681e;
    GUEST_RFLAGS = 0x6820;
    GUEST_PENDING_DBG_EXCEPTIONS = 0x6822;
    GUEST_SYSENTER_ESP = 0x6824;
    GUEST_SYSENTER_EIP = 0x6826;
    HOST_CR0 = 0x6c00;
    HOST_CR3 = 0x6c02;
    HOST_CR4 = 0x6c04;
    HOST_FS_BASE = 0x6c06;
    HOST_GS_BASE = 0x6c08;
    HOST_TR_BASE = 0x6c0a;
    HOST_GDTR_BASE = 0x6c0c;
    HOST_IDTR_BASE = 0x6c0e;
    HOST_IA32_SYSENTER_ESP = 0x6c10;
    HOST_IA32_SYSENTER_EIP = 0x6c12;
    HOST_RSP = 0x6c14;
    HOST_RIP = 0x6c16;
}

/// The slot of a full field (access type 0) in [`FIELDS`].
pub fn slot(enc: u32) -> Option<usize> {
    FIELDS.binary_search_by_key(&enc, |f| f.0).ok()
}

/// The name of the field with encoding `enc` (a 64-bit field's high half is
/// named after the field).
pub fn name(enc: u32) -> Option<&'static str> {
    slot(enc & !1).map(|k| FIELDS[k].1)
}

/// The highest index (bits 9:1) of any supported encoding, as
/// IA32_VMX_VMCS_ENUM reports it.
pub fn highest_index() -> u32 {
    FIELDS.iter().map(|f| (f.0 >> 1) & 0x1ff).max().unwrap_or(0)
}

/// Exit reasons (basic exit reason, bits 15:0 of the exit-reason field).
pub mod reason {
    pub const EXCEPTION_NMI: u32 = 0;
    pub const EXTERNAL_INTERRUPT: u32 = 1;
    pub const TRIPLE_FAULT: u32 = 2;
    pub const INIT: u32 = 3;
    pub const INTERRUPT_WINDOW: u32 = 7;
    pub const NMI_WINDOW: u32 = 8;
    pub const CPUID: u32 = 10;
    pub const HLT: u32 = 12;
    pub const INVD: u32 = 13;
    pub const INVLPG: u32 = 14;
    pub const RDPMC: u32 = 15;
    pub const RDTSC: u32 = 16;
    pub const VMCALL: u32 = 18;
    pub const VMCLEAR: u32 = 19;
    pub const VMLAUNCH: u32 = 20;
    pub const VMPTRLD: u32 = 21;
    pub const VMPTRST: u32 = 22;
    pub const VMREAD: u32 = 23;
    pub const VMRESUME: u32 = 24;
    pub const VMWRITE: u32 = 25;
    pub const VMXOFF: u32 = 26;
    pub const VMXON: u32 = 27;
    pub const CR_ACCESS: u32 = 28;
    pub const DR_ACCESS: u32 = 29;
    pub const IO_INSTRUCTION: u32 = 30;
    pub const MSR_READ: u32 = 31;
    pub const MSR_WRITE: u32 = 32;
    pub const INVALID_GUEST_STATE: u32 = 33;
    pub const MSR_LOAD_FAIL: u32 = 34;
    pub const MWAIT: u32 = 36;
    pub const MONITOR_TRAP_FLAG: u32 = 37;
    pub const MONITOR: u32 = 39;
    pub const PAUSE: u32 = 40;
    pub const EPT_VIOLATION: u32 = 48;
    pub const EPT_MISCONFIG: u32 = 49;
    pub const INVEPT: u32 = 50;
    pub const RDTSCP: u32 = 51;
    pub const PREEMPTION_TIMER: u32 = 52;
    pub const INVVPID: u32 = 53;
    /// Bit 31 of the exit-reason field: the VM entry failed.
    pub const ENTRY_FAILURE: u32 = 1 << 31;

    /// The name of basic exit reason `r`.
    pub fn name(r: u32) -> &'static str {
        match r & 0xffff {
            EXCEPTION_NMI => "EXCEPTION_NMI",
            EXTERNAL_INTERRUPT => "EXTERNAL_INTERRUPT",
            TRIPLE_FAULT => "TRIPLE_FAULT",
            INIT => "INIT",
            INTERRUPT_WINDOW => "INTERRUPT_WINDOW",
            NMI_WINDOW => "NMI_WINDOW",
            CPUID => "CPUID",
            HLT => "HLT",
            INVD => "INVD",
            INVLPG => "INVLPG",
            RDPMC => "RDPMC",
            RDTSC => "RDTSC",
            VMCALL => "VMCALL",
            VMCLEAR => "VMCLEAR",
            VMLAUNCH => "VMLAUNCH",
            VMPTRLD => "VMPTRLD",
            VMPTRST => "VMPTRST",
            VMREAD => "VMREAD",
            VMRESUME => "VMRESUME",
            VMWRITE => "VMWRITE",
            VMXOFF => "VMXOFF",
            VMXON => "VMXON",
            CR_ACCESS => "CR_ACCESS",
            DR_ACCESS => "DR_ACCESS",
            IO_INSTRUCTION => "IO_INSTRUCTION",
            MSR_READ => "MSR_READ",
            MSR_WRITE => "MSR_WRITE",
            INVALID_GUEST_STATE => "INVALID_GUEST_STATE",
            MSR_LOAD_FAIL => "MSR_LOAD_FAIL",
            MWAIT => "MWAIT",
            MONITOR_TRAP_FLAG => "MONITOR_TRAP_FLAG",
            MONITOR => "MONITOR",
            PAUSE => "PAUSE",
            EPT_VIOLATION => "EPT_VIOLATION",
            EPT_MISCONFIG => "EPT_MISCONFIG",
            INVEPT => "INVEPT",
            RDTSCP => "RDTSCP",
            PREEMPTION_TIMER => "PREEMPTION_TIMER",
            INVVPID => "INVVPID",
            _ => "UNKNOWN",
        }
    }
}

/// VM-instruction error numbers (the VM-instruction error field).
pub mod error {
    pub const VMCALL_IN_ROOT: u32 = 1;
    pub const VMCLEAR_INVALID_ADDRESS: u32 = 2;
    pub const VMCLEAR_VMXON_POINTER: u32 = 3;
    pub const VMLAUNCH_NONCLEAR: u32 = 4;
    pub const VMRESUME_NONLAUNCHED: u32 = 5;
    pub const ENTRY_INVALID_CONTROLS: u32 = 7;
    pub const ENTRY_INVALID_HOST_STATE: u32 = 8;
    pub const VMPTRLD_INVALID_ADDRESS: u32 = 9;
    pub const VMPTRLD_VMXON_POINTER: u32 = 10;
    pub const VMPTRLD_BAD_REVISION: u32 = 11;
    pub const UNSUPPORTED_FIELD: u32 = 12;
    pub const VMWRITE_READ_ONLY: u32 = 13;
    pub const VMXON_IN_ROOT: u32 = 15;
    pub const ENTRY_MOV_SS_BLOCKING: u32 = 26;
    pub const INVALID_INVEPT_INVVPID_OPERAND: u32 = 28;
}
