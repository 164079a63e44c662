//! The option table: every option Tessera knows, whether it takes an argument, and the implied first key of
//! its QemuOpts value. Options QEMU 8.2 has and Tessera does not are listed too, so that they fail with
//! "not supported yet" instead of QEMU's "invalid option" (which would suggest a typo).

/// What an option is, for the code that interprets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opt {
    Machine,
    Accel,
    EnableKvm,
    Cpu,
    Smp,
    Memory,
    Kernel,
    Initrd,
    Append,
    Bios,
    Serial,
    Chardev,
    Device,
    Drive,
    Blockdev,
    Nographic,
    Display,
    Name,
    NoReboot,
    NoShutdown,
    StartPaused,
    Daemonize,
    Pidfile,
    Runas,
    Chroot,
    Sandbox,
    RunWith,
    Object,
    LogFile,
    LogItems,
    Version,
    Help,
    Readconfig,
    Monitor,
    Nodefaults,
    /// `-nic` and `-netdev` (launcher/src/net.rs).
    Nic,
    Netdev,
    /// A QEMU option Tessera does not implement yet.
    Unsupported,
    /// Tessera's own debugging aid: print the process graph the command line plans, start nothing.
    DumpPlan,
    /// `-qmp dev`: a QMP monitor on a listening socket.
    Qmp,
    /// `-mon chardev=id,mode=control`.
    Mon,
    /// `-tessera-restart-limit N`: backend restarts in a row before a device is reported failed.
    RestartLimit,
}

#[derive(Debug, PartialEq, Eq)]
pub struct OptionDef {
    /// The name without its dash; aliases after the first (`-M` for `-machine`).
    pub names: &'static [&'static str],
    pub takes_arg: bool,
    /// The QemuOpts key a first element without `key=` stands for (`-m 1G` is `size=1G`).
    pub implied: Option<&'static str>,
    pub opt: Opt,
    /// One line for `-h` (empty for options that are not listed there).
    pub help: &'static str,
}

const fn def(
    names: &'static [&'static str],
    takes_arg: bool,
    implied: Option<&'static str>,
    opt: Opt,
    help: &'static str,
) -> OptionDef {
    OptionDef { names, takes_arg, implied, opt, help }
}

const fn unsupported(names: &'static [&'static str], takes_arg: bool) -> OptionDef {
    OptionDef { names, takes_arg, implied: None, opt: Opt::Unsupported, help: "" }
}

#[rustfmt::skip]
pub static OPTIONS: &[OptionDef] = &[
    def(&["machine", "M"], true, Some("type"), Opt::Machine, "-machine [type=]pc[,accel=kvm|tcg][,memory-backend=id]"),
    def(&["accel"], true, Some("accel"), Opt::Accel, "-accel kvm|tcg   select the accelerator (repeat to give fallbacks)"),
    def(&["enable-kvm"], false, None, Opt::EnableKvm, "-enable-kvm      same as -machine accel=kvm"),
    def(&["cpu"], true, Some("model"), Opt::Cpu, "-cpu host|max|qemu64"),
    def(&["smp"], true, Some("cpus"), Opt::Smp, "-smp [cpus=]n[,maxcpus=m][,sockets=s][,dies=d][,cores=c][,threads=t]"),
    def(&["m"], true, Some("size"), Opt::Memory, "-m [size=]megs[,slots=n,maxmem=size]   guest RAM (default unit MiB)"),
    def(&["kernel"], true, None, Opt::Kernel, "-kernel file     a Linux bzImage or a PVH ELF"),
    def(&["initrd"], true, None, Opt::Initrd, "-initrd file     initial ram disk"),
    def(&["append"], true, None, Opt::Append, "-append cmdline  kernel command line"),
    def(&["bios"], true, None, Opt::Bios, ""),
    def(&["serial"], true, None, Opt::Serial, "-serial dev      stdio, mon:stdio, null, none, file:path, pty, tcp:host:port[,server=on,wait=off], unix:path[,server=on], chardev:id"),
    def(&["chardev"], true, Some("backend"), Opt::Chardev, "-chardev null|stdio|file|socket|pty,id=id[,mux=on][,logfile=path][,...]"),
    def(&["device"], true, Some("driver"), Opt::Device, "-device isa-debug-exit[,iobase=0x501][,iosize=2]"),
    def(&["nographic"], false, None, Opt::Nographic, "-nographic       no display; serial port and monitor on the terminal (Ctrl-A h for help)"),
    def(&["display"], true, Some("type"), Opt::Display, "-display none"),
    def(&["name"], true, Some("guest"), Opt::Name, "-name string     the guest's name"),
    def(&["no-reboot"], false, None, Opt::NoReboot, "-no-reboot       exit instead of rebooting"),
    def(&["no-shutdown"], false, None, Opt::NoShutdown, "-no-shutdown     stop the guest, not the processes, on power-off"),
    def(&["S"], false, None, Opt::StartPaused, "-S               do not start the vCPUs"),
    def(&["daemonize"], false, None, Opt::Daemonize, "-daemonize       detach once the guest runs"),
    def(&["pidfile"], true, None, Opt::Pidfile, "-pidfile file    write the launcher's pid to file"),
    def(&["runas"], true, None, Opt::Runas, "-runas user[:group]   run every Tessera process as this user (needs root)"),
    def(&["chroot"], true, None, Opt::Chroot, "-chroot dir      every Tessera process sees dir (read-only) as its root"),
    def(&["sandbox"], true, Some("enable"), Opt::Sandbox, "-sandbox on|off[,obsolete=..][,elevateprivileges=..][,spawn=..][,resourcecontrol=..][,seccomp=kill|log][,landlock=on|off|auto]   confine each process (docs/SECURITY.md)"),
    def(&["run-with"], true, None, Opt::RunWith, "-run-with [chroot=dir][,user=user[:group]][,async-teardown=off]"),
    def(&["object"], true, Some("qom-type"), Opt::Object, "-object memory-backend-memfd,id=id,size=size[,share=on|off]"),
    def(&["D"], true, None, Opt::LogFile, "-D logfile       write the -d log to logfile"),
    def(&["d"], true, None, Opt::LogItems, "-d item1,...     log items (-d help lists them)"),
    def(&["version"], false, None, Opt::Version, "-version         print the version"),
    def(&["h", "help"], false, None, Opt::Help, "-h, -help        print this help"),
    def(&["readconfig"], true, None, Opt::Readconfig, ""),
    def(&["monitor"], true, None, Opt::Monitor, "-monitor none"),
    def(&["nodefaults"], false, None, Opt::Nodefaults, "-nodefaults      no default serial port"),
    def(
        &["drive"],
        true,
        Some("file"),
        Opt::Drive,
        "-drive file=IMG,if=virtio|none[,format=raw|qcow2][,readonly=on][,cache=writeback|none][,aio=threads|io_uring][,discard=][,id=]",
    ),
    def(&["netdev"], true, Some("type"), Opt::Netdev, "-netdev user|tap|vhost-user,id=id[,...]   a network backend for -device virtio-net-pci,netdev=id"),
    def(&["nic"], true, Some("type"), Opt::Nic, "-nic user|tap|vhost-user|none[,model=virtio-net-pci][,mac=][,...]   a virtio-net-pci NIC and its backend"),
    def(
        &["blockdev"],
        true,
        None,
        Opt::Blockdev,
        "-blockdev driver=file,node-name=N,filename=IMG | driver=raw|qcow2,node-name=N,file=FILENODE",
    ),
    def(&["tessera-dump-plan"], false, None, Opt::DumpPlan, ""),
    def(&["qmp"], true, None, Opt::Qmp, "-qmp unix:path,server=on[,wait=off] | tcp:host:port,server=on[,wait=off]   a QMP monitor (docs/qmp.md)"),
    def(&["mon"], true, Some("chardev"), Opt::Mon, "-mon chardev=id,mode=control[,pretty=on]   a QMP monitor on a socket -chardev"),
    def(&["tessera-restart-limit"], true, None, Opt::RestartLimit, "-tessera-restart-limit n   restarts of a dying backend in a row before its device is reported failed (default 10; 0: a backend's death ends the VM)"),
    // QEMU 8.2 options Tessera does not implement yet.
    unsupported(&["action"], true),
    unsupported(&["add-fd"], true),
    unsupported(&["acpitable"], true),
    unsupported(&["audio"], true),
    unsupported(&["audiodev"], true),
    unsupported(&["boot"], true),
    unsupported(&["cdrom"], true),
    unsupported(&["compat"], true),
    unsupported(&["debugcon"], true),
    unsupported(&["dfilter"], true),
    unsupported(&["dtb"], true),
    unsupported(&["echr"], true),
    unsupported(&["fda"], true),
    unsupported(&["fdb"], true),
    unsupported(&["fsdev"], true),
    unsupported(&["fw_cfg"], true),
    unsupported(&["gdb"], true),
    unsupported(&["global"], true),
    unsupported(&["hda"], true),
    unsupported(&["hdb"], true),
    unsupported(&["hdc"], true),
    unsupported(&["hdd"], true),
    unsupported(&["icount"], true),
    unsupported(&["incoming"], true),
    unsupported(&["iscsi"], true),
    unsupported(&["k"], true),
    unsupported(&["L"], true),
    unsupported(&["loadvm"], true),
    unsupported(&["mem-path"], true),
    unsupported(&["msg"], true),
    unsupported(&["mtdblock"], true),
    unsupported(&["net"], true),
    unsupported(&["numa"], true),
    unsupported(&["option-rom"], true),
    unsupported(&["overcommit"], true),
    unsupported(&["parallel"], true),
    unsupported(&["pflash"], true),
    unsupported(&["plugin"], true),
    unsupported(&["qmp-pretty"], true),
    unsupported(&["rtc"], true),
    unsupported(&["sd"], true),
    unsupported(&["seed"], true),
    unsupported(&["semihosting-config"], true),
    unsupported(&["set"], true),
    unsupported(&["smbios"], true),
    unsupported(&["spice"], true),
    unsupported(&["tpmdev"], true),
    unsupported(&["trace"], true),
    unsupported(&["usbdevice"], true),
    unsupported(&["uuid"], true),
    unsupported(&["vga"], true),
    unsupported(&["virtfs"], true),
    unsupported(&["vnc"], true),
    unsupported(&["watchdog-action"], true),
    unsupported(&["xen-domid"], true),
    unsupported(&["async-teardown"], false),
    unsupported(&["full-screen"], false),
    unsupported(&["mem-prealloc"], false),
    unsupported(&["no-acpi"], false),
    unsupported(&["no-hpet"], false),
    unsupported(&["no-user-config"], false),
    unsupported(&["nodefconfig"], false),
    unsupported(&["only-migratable"], false),
    unsupported(&["preconfig"], false),
    unsupported(&["s"], false),
    unsupported(&["snapshot"], false),
    unsupported(&["usb"], false),
    unsupported(&["win2k-hack"], false),
];

/// The text of `-h`.
pub fn help_text(prog: &str) -> String {
    let mut s = format!(
        "{} (QEMU 8.2 command line)\nusage: {prog} [options]\n\nOptions Tessera implements:\n",
        crate::version_line()
    );
    for d in OPTIONS.iter().filter(|d| !d.help.is_empty()) {
        s.push_str(d.help);
        s.push('\n');
    }
    s.push_str(
        "\nOther QEMU options are recognised and refused with \"not supported yet\".\n\
         Environment: TESSERA_LIBEXEC_DIR overrides where tessera-core and tessera-chardev are looked up\n\
         (default: next to this program).\n",
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for d in OPTIONS {
            for n in d.names {
                assert!(seen.insert(*n), "option -{n} is listed twice");
            }
        }
    }
}
