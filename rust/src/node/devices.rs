//! This task's devices, found when its server is made and named as TensorFlow names them:
//! `/job:<job>/replica:0/task:<index>/device:CPU:0`, `.../device:GPU:<n>`.
//!
//! The CPU device carries the memory this process may use: the lowest cgroup limit that binds it,
//! else the machine's memory. NVIDIA GPUs are found through NVML, loaded at run time where the
//! driver installed it (no CUDA needed to build or run), else through the driver's `/proc` files;
//! finding none is a normal answer. Everything that reads the system is a thin shell around pure
//! parsers, so all of it is tested without a GPU.

use std::path::Path;
use std::sync::OnceLock;

use crate::base::cluster::TaskId;
use crate::base::memory;
use crate::proto::{DeviceAttributes, DeviceLocality};

/// An NVIDIA GPU as the machine reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gpu {
    pub name: String,
    /// Total memory in bytes; 0 when unknown (the `/proc` files do not say).
    pub memory_bytes: u64,
    /// `0000:04:00.0`: domain, bus, device and function in lower-case hex.
    pub pci_bus_id: String,
    /// `GPU-<uuid>`, which `CUDA_VISIBLE_DEVICES` may use instead of an index.
    pub uuid: String,
    pub numa_node: Option<u32>,
}

/// This task's devices, each with a new random incarnation: the CPU, then every GPU visible to
/// this process.
pub fn discover(task: &TaskId) -> Vec<DeviceAttributes> {
    let visible_devices = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    let gpus = visible(machine_gpus(), visible_devices.as_deref());
    describe(task, memory::process_memory_limit(), &gpus)
}

/// The device records of a task with `cpu_memory` bytes and `gpus`, in TensorFlow's form.
pub fn describe(task: &TaskId, cpu_memory: u64, gpus: &[Gpu]) -> Vec<DeviceAttributes> {
    let prefix = task.device_prefix();
    // TensorFlow gives its CPU device an empty locality, and a GPU its NUMA node + 1 as bus id
    // (bus 0 means "no specific locality").
    let cpu = record(
        format!("{prefix}/device:CPU:0"),
        "CPU",
        cpu_memory,
        DeviceLocality::default(),
        String::new(),
    );
    let gpus = gpus.iter().enumerate().map(|(n, gpu)| {
        let numa_node = gpu.numa_node.and_then(|node| i32::try_from(node).ok());
        let numa_node = numa_node.unwrap_or(0);
        let locality = DeviceLocality {
            bus_id: numa_node.saturating_add(1),
            numa_node,
            links: None,
        };
        let description = format!(
            "device: {n}, name: {}, pci bus id: {}",
            gpu.name, gpu.pci_bus_id
        );
        record(
            format!("{prefix}/device:GPU:{n}"),
            "GPU",
            gpu.memory_bytes,
            locality,
            description,
        )
    });
    std::iter::once(cpu).chain(gpus).collect()
}

fn record(
    name: String,
    device_type: &str,
    memory: u64,
    locality: DeviceLocality,
    physical_device_desc: String,
) -> DeviceAttributes {
    DeviceAttributes {
        name,
        device_type: device_type.to_owned(),
        memory_limit: i64::try_from(memory).unwrap_or(i64::MAX),
        locality: Some(locality),
        incarnation: rand::random::<u64>() | 1,
        physical_device_desc,
        // TensorFlow's value for "no XLA id".
        xla_global_id: -1,
    }
}

/// The GPUs CUDA would show this process, in its order. `CUDA_VISIBLE_DEVICES` lists indices or
/// UUIDs (`GPU-...`, a prefix is enough) and, as in CUDA, ends at the first entry that names no
/// GPU; unset shows them all.
pub fn visible(gpus: Vec<Gpu>, cuda_visible_devices: Option<&str>) -> Vec<Gpu> {
    let Some(entries) = cuda_visible_devices else {
        return gpus;
    };
    let mut shown: Vec<Gpu> = Vec::new();
    for entry in entries.split(',').map(str::trim) {
        let found = match entry.parse::<usize>() {
            Ok(index) => gpus.get(index),
            Err(_) => gpus
                .iter()
                .find(|gpu| !entry.is_empty() && gpu.uuid.starts_with(entry)),
        };
        match found {
            Some(gpu) if !shown.contains(gpu) => shown.push(gpu.clone()),
            _ => break,
        }
    }
    shown
}

/// The machine's GPUs, looked for once per process: the hardware does not change, and starting
/// NVML takes a while on a large machine.
fn machine_gpus() -> Vec<Gpu> {
    static GPUS: OnceLock<Vec<Gpu>> = OnceLock::new();
    GPUS.get_or_init(|| {
        let mut gpus = nvml::gpus().unwrap_or_else(proc_gpus);
        for gpu in &mut gpus {
            let file = Path::new("/sys/bus/pci/devices")
                .join(&gpu.pci_bus_id)
                .join("numa_node");
            gpu.numa_node = read(&file).and_then(|text| parse_numa_node(&text));
        }
        gpus
    })
    .clone()
}

/// The GPUs the NVIDIA driver lists under `/proc`, in PCI order (which is NVML's order too).
fn proc_gpus() -> Vec<Gpu> {
    let Ok(entries) = std::fs::read_dir("/proc/driver/nvidia/gpus") else {
        return Vec::new();
    };
    let mut gpus: Vec<Gpu> = entries
        .filter_map(|entry| read(&entry.ok()?.path().join("information")))
        .filter_map(|text| parse_proc_gpu(&text))
        .collect();
    gpus.sort_by(|a, b| a.pci_bus_id.cmp(&b.pci_bus_id));
    gpus
}

/// One GPU from the driver's `/proc/driver/nvidia/gpus/<bus id>/information` ("Key: value"
/// lines); the file does not give the memory size.
pub fn parse_proc_gpu(information: &str) -> Option<Gpu> {
    let field = |key: &str| {
        information.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            (name.trim() == key).then(|| value.trim().to_owned())
        })
    };
    Some(Gpu {
        name: field("Model")?,
        pci_bus_id: normalize_bus_id(&field("Bus Location")?),
        uuid: field("GPU UUID").unwrap_or_default(),
        ..Gpu::default()
    })
}

/// A PCI bus id in the form sysfs and TensorFlow use: NVML writes the domain with 8 digits and
/// in upper case (`00000000:04:00.0`), sysfs with 4 in lower case (`0000:04:00.0`).
pub fn normalize_bus_id(bus_id: &str) -> String {
    let bus_id = bus_id.trim().to_ascii_lowercase();
    if let Some((domain, rest)) = bus_id.split_once(':')
        && let Ok(domain) = u32::from_str_radix(domain, 16)
    {
        return format!("{domain:04x}:{rest}");
    }
    bus_id
}

/// A sysfs `numa_node` file: -1 means the kernel does not know.
pub fn parse_numa_node(text: &str) -> Option<u32> {
    text.trim().parse().ok()
}

/// NVIDIA's management library, present wherever the driver is installed.
mod nvml {
    use std::ffi::{CStr, c_char, c_uint, c_void};

    use super::{Gpu, normalize_bus_id};

    type Return = c_uint;
    type Device = *mut c_void;
    const SUCCESS: Return = 0;
    /// NVML_DEVICE_NAME_V2_BUFFER_SIZE, also enough for a UUID.
    const TEXT_BYTES: usize = 96;

    #[repr(C)]
    #[derive(Default)]
    struct Memory {
        total: u64,
        _free: u64,
        _used: u64,
    }

    /// `nvmlPciInfo_t` as `nvmlDeviceGetPciInfo_v3` fills it.
    #[repr(C)]
    #[derive(Default)]
    struct PciInfo {
        _bus_id_legacy: [u8; 16],
        _domain: c_uint,
        _bus: c_uint,
        _device: c_uint,
        _pci_device_id: c_uint,
        _pci_sub_system_id: c_uint,
        bus_id: [u8; 32],
    }

    /// The entry points used, with nvml.h's prototypes.
    struct Api {
        init: unsafe extern "C" fn() -> Return,
        shutdown: unsafe extern "C" fn() -> Return,
        count: unsafe extern "C" fn(*mut c_uint) -> Return,
        handle: unsafe extern "C" fn(c_uint, *mut Device) -> Return,
        name: unsafe extern "C" fn(Device, *mut c_char, c_uint) -> Return,
        uuid: unsafe extern "C" fn(Device, *mut c_char, c_uint) -> Return,
        memory: unsafe extern "C" fn(Device, *mut Memory) -> Return,
        pci: unsafe extern "C" fn(Device, *mut PciInfo) -> Return,
    }

    /// Every GPU NVML reports, in its index order; `None` where NVML is absent or cannot start.
    pub fn gpus() -> Option<Vec<Gpu>> {
        // SAFETY: loading the library runs only its own initialisers.
        let library = unsafe { libloading::Library::new("libnvidia-ml.so.1") }.ok()?;
        // SAFETY: each symbol is declared with its prototype from nvml.h.
        let api = unsafe {
            Api {
                init: *library.get(c"nvmlInit_v2").ok()?,
                shutdown: *library.get(c"nvmlShutdown").ok()?,
                count: *library.get(c"nvmlDeviceGetCount_v2").ok()?,
                handle: *library.get(c"nvmlDeviceGetHandleByIndex_v2").ok()?,
                name: *library.get(c"nvmlDeviceGetName").ok()?,
                uuid: *library.get(c"nvmlDeviceGetUUID").ok()?,
                memory: *library.get(c"nvmlDeviceGetMemoryInfo").ok()?,
                pci: *library.get(c"nvmlDeviceGetPciInfo_v3").ok()?,
            }
        };
        // Kept loaded for the life of the process, as NVML's Python bindings do: the driver's
        // libraries are not made to be unloaded, and this keeps `api`'s pointers valid.
        std::mem::forget(library);
        // SAFETY: the pointers are valid (above); `list` runs between init and shutdown.
        unsafe {
            if (api.init)() != SUCCESS {
                return None;
            }
            let gpus = api.list();
            (api.shutdown)();
            Some(gpus)
        }
    }

    impl Api {
        /// # Safety
        /// NVML must be initialised.
        unsafe fn list(&self) -> Vec<Gpu> {
            let mut count: c_uint = 0;
            // SAFETY: `count` is a valid out-pointer.
            if unsafe { (self.count)(&mut count) } != SUCCESS {
                return Vec::new();
            }
            (0..count)
                .filter_map(|index| {
                    let mut device: Device = std::ptr::null_mut();
                    let mut name = [0u8; TEXT_BYTES];
                    let mut uuid = [0u8; TEXT_BYTES];
                    let mut memory = Memory::default();
                    let mut pci = PciInfo::default();
                    // SAFETY: out-pointers to buffers of the sizes given. A query that fails
                    // leaves its buffer zeroed: that detail stays unknown.
                    unsafe {
                        if (self.handle)(index, &mut device) != SUCCESS {
                            return None;
                        }
                        (self.name)(device, name.as_mut_ptr().cast(), TEXT_BYTES as c_uint);
                        (self.uuid)(device, uuid.as_mut_ptr().cast(), TEXT_BYTES as c_uint);
                        (self.memory)(device, &mut memory);
                        (self.pci)(device, &mut pci);
                    }
                    Some(Gpu {
                        name: text(&name),
                        memory_bytes: memory.total,
                        pci_bus_id: normalize_bus_id(&text(&pci.bus_id)),
                        uuid: text(&uuid),
                        numa_node: None,
                    })
                })
                .collect()
        }
    }

    fn text(buffer: &[u8]) -> String {
        CStr::from_bytes_until_nul(buffer)
            .map(|text| text.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(bus: &str, uuid: &str) -> Gpu {
        Gpu {
            name: "NVIDIA H100 80GB HBM3".into(),
            memory_bytes: 80 << 30,
            pci_bus_id: bus.into(),
            uuid: uuid.into(),
            numa_node: None,
        }
    }

    #[test]
    fn the_drivers_proc_file_describes_a_gpu() {
        let information = "Model: \t\t NVIDIA H100 80GB HBM3\nIRQ:   \t\t 145\n\
             GPU UUID: \t GPU-5f0e6b4c-1d2e-4a3b-8c9d-0123456789ab\nVideo BIOS: \t 96.00.74.00.01\n\
             Bus Type: \t PCIe\nDMA Size: \t 52 bits\nDMA Mask: \t 0xfffffffffffff\n\
             Bus Location: \t 0000:1B:00.0\nDevice Minor: \t 0\nGPU Excluded:\t No\n";
        assert_eq!(
            parse_proc_gpu(information),
            Some(Gpu {
                name: "NVIDIA H100 80GB HBM3".into(),
                memory_bytes: 0,
                pci_bus_id: "0000:1b:00.0".into(),
                uuid: "GPU-5f0e6b4c-1d2e-4a3b-8c9d-0123456789ab".into(),
                numa_node: None,
            })
        );
        assert_eq!(parse_proc_gpu("IRQ: 1\n"), None);
    }

    #[test]
    fn bus_ids_take_the_sysfs_form() {
        assert_eq!(normalize_bus_id("00000000:04:00.0"), "0000:04:00.0");
        assert_eq!(normalize_bus_id("0000:AB:00.1"), "0000:ab:00.1");
        assert_eq!(normalize_bus_id(""), "");
        assert_eq!(parse_numa_node("1\n"), Some(1));
        assert_eq!(parse_numa_node("-1\n"), None);
    }

    #[test]
    fn cuda_visible_devices_selects_and_orders_gpus() {
        let gpus = vec![
            gpu("0000:04:00.0", "GPU-aaaa"),
            gpu("0000:05:00.0", "GPU-bbbb"),
            gpu("0000:06:00.0", "GPU-cccc"),
        ];
        let buses = |shown: Vec<Gpu>| -> Vec<String> {
            shown
                .into_iter()
                .map(|g| g.pci_bus_id[5..7].to_owned())
                .collect()
        };
        assert_eq!(buses(visible(gpus.clone(), None)), ["04", "05", "06"]);
        assert_eq!(buses(visible(gpus.clone(), Some("2,0"))), ["06", "04"]);
        assert_eq!(
            buses(visible(gpus.clone(), Some("GPU-bb, 0"))),
            ["05", "04"]
        );
        // CUDA stops at the first entry that names no GPU.
        assert_eq!(buses(visible(gpus.clone(), Some("1,7,0"))), ["05"]);
        assert_eq!(buses(visible(gpus.clone(), Some("0,0"))), ["04"]);
        assert!(visible(gpus.clone(), Some("")).is_empty());
        assert!(visible(gpus, Some("-1")).is_empty());
    }

    #[test]
    fn devices_are_named_and_described_as_tensorflow_does() {
        let task = TaskId::new("worker", 3);
        let mut second = gpu("0000:05:00.0", "GPU-bbbb");
        second.numa_node = Some(1);
        let devices = describe(&task, 16 << 30, &[gpu("0000:04:00.0", "GPU-aaaa"), second]);
        let names: Vec<&str> = devices.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "/job:worker/replica:0/task:3/device:CPU:0",
                "/job:worker/replica:0/task:3/device:GPU:0",
                "/job:worker/replica:0/task:3/device:GPU:1",
            ]
        );
        let (cpu, gpu0, gpu1) = (&devices[0], &devices[1], &devices[2]);
        assert_eq!(cpu.device_type, "CPU");
        assert_eq!(cpu.memory_limit, 16 << 30);
        assert_eq!(cpu.locality, Some(DeviceLocality::default()));
        assert_eq!(cpu.physical_device_desc, "");
        assert_eq!(gpu0.device_type, "GPU");
        assert_eq!(gpu0.memory_limit, 80 << 30);
        assert_eq!(
            gpu0.physical_device_desc,
            "device: 0, name: NVIDIA H100 80GB HBM3, pci bus id: 0000:04:00.0"
        );
        let locality = |d: &DeviceAttributes| d.locality.clone().unwrap_or_default();
        assert_eq!((locality(gpu0).bus_id, locality(gpu0).numa_node), (1, 0));
        assert_eq!((locality(gpu1).bus_id, locality(gpu1).numa_node), (2, 1));
        let incarnations: std::collections::HashSet<u64> =
            devices.iter().map(|d| d.incarnation).collect();
        assert!(!incarnations.contains(&0));
        assert_eq!(incarnations.len(), 3);
    }

    #[test]
    fn every_start_gets_new_incarnations() {
        let task = TaskId::new("ps", 0);
        let first = describe(&task, 1, &[]);
        let second = describe(&task, 1, &[]);
        assert_eq!(first[0].name, second[0].name);
        assert_ne!(first[0].incarnation, second[0].incarnation);
    }

    #[test]
    fn discovery_finds_at_least_the_cpu_with_its_memory() {
        let devices = discover(&TaskId::new("localhost", 0));
        assert_eq!(
            devices[0].name,
            "/job:localhost/replica:0/task:0/device:CPU:0"
        );
        assert!(devices[0].memory_limit > 0);
        assert!(devices[1..].iter().all(|d| d.device_type == "GPU"));
    }
}
