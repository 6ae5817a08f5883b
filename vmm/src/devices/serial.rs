// SPDX-License-Identifier: Apache-2.0
//! COM1: a 16550A UART (vm-superio) at port 0x3f8 on IRQ 4, wired to the VMM's stdout and stdin.

use std::collections::VecDeque;
use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_device::MutDevicePio;
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_superio::Serial;
use vm_superio::serial::{NoEvents, SerialState};

use super::EventFdTrigger;

/// COM1's base port.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
/// Ports a UART occupies.
pub const SERIAL_PORT_SIZE: u16 = 8;
const DATA_OFFSET: u8 = 0;

/// vm-superio's `SerialState`, made serialisable (the `vm-superio-ser` crate pins an older
/// vm-superio).
#[derive(Serialize, Deserialize)]
#[serde(remote = "SerialState")]
struct SerialStateDef {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// The UART's registers and unread input, for migration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialPortState {
    #[serde(with = "SerialStateDef")]
    pub uart: SerialState,
    /// Console input not yet in the FIFO.
    pub pending_input: Vec<u8>,
}

/// The UART plus console input it could not take yet (its FIFO holds 64 bytes).
pub struct SerialPort {
    serial: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
    pending_input: VecDeque<u8>,
}

impl SerialPort {
    pub fn new(interrupt: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        Self { serial: Serial::new(interrupt, out), pending_input: VecDeque::new() }
    }

    /// The eventfd that raises the UART's interrupt (registered as an irqfd).
    pub fn interrupt_evt(&self) -> &EventFdTrigger {
        self.serial.interrupt_evt()
    }

    /// Queues console input for the guest; what the FIFO cannot take waits until the guest reads.
    pub fn enqueue_input(&mut self, bytes: &[u8]) {
        self.pending_input.extend(bytes);
        self.fill_fifo();
    }

    pub fn save_state(&self) -> SerialPortState {
        SerialPortState { uart: self.serial.state(), pending_input: self.pending_input.iter().copied().collect() }
    }

    /// Restores the registers and FIFO; the interrupt line and the output stay this port's.
    pub fn restore_state(&mut self, state: &SerialPortState) -> std::io::Result<()> {
        let trigger = EventFdTrigger(self.serial.interrupt_evt().0.try_clone()?);
        let out = std::mem::replace(self.serial.writer_mut(), Box::new(std::io::sink()));
        self.serial = Serial::from_state(&state.uart, trigger, NoEvents, out)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("serial state: {e:?}")))?;
        self.pending_input = state.pending_input.iter().copied().collect();
        Ok(())
    }

    fn fill_fifo(&mut self) {
        while !self.pending_input.is_empty() && self.serial.fifo_capacity() > 0 {
            let n = self.serial.fifo_capacity().min(self.pending_input.len());
            let chunk: Vec<u8> = self.pending_input.drain(..n).collect();
            // The FIFO had room for `n` bytes, so only the interrupt can fail; the bytes are in.
            if let Err(e) = self.serial.enqueue_raw_bytes(&chunk) {
                log::warn!("serial: failed to signal input to the guest: {e}");
                break;
            }
        }
    }
}

impl MutDevicePio for SerialPort {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        if data.len() != 1 {
            return;
        }
        let Ok(offset) = u8::try_from(offset) else {
            return;
        };
        data[0] = self.serial.read(offset);
        if offset == DATA_OFFSET {
            self.fill_fifo();
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        let Ok(offset) = u8::try_from(offset) else {
            return;
        };
        // A failing stdout (closed pipe) must not stop the guest: drop the byte, say why once.
        if let Err(e) = self.serial.write(offset, data[0]) {
            log::debug!("serial: write failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);
    impl Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    const BASE: PioAddress = PioAddress(SERIAL_PORT_BASE);

    #[test]
    fn output_reaches_the_writer() {
        let buf = SharedBuf::default();
        let mut port = SerialPort::new(EventFdTrigger::new().unwrap(), Box::new(buf.clone()));
        for b in b"hi\n" {
            port.pio_write(BASE, 0, &[*b]);
        }
        assert_eq!(&*buf.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn input_beyond_the_fifo_waits_and_is_not_lost() {
        let mut port = SerialPort::new(EventFdTrigger::new().unwrap(), Box::new(std::io::sink()));
        // Enable the received-data interrupt, as a driver would.
        port.pio_write(BASE, 1, &[1]);
        let input: Vec<u8> = (0..200u8).collect();
        port.enqueue_input(&input);
        assert_eq!(port.interrupt_evt().0.read().unwrap(), 1, "interrupt raised");
        let mut got = Vec::new();
        for _ in 0..200 {
            let mut lsr = [0u8];
            port.pio_read(BASE, 5, &mut lsr);
            assert_ne!(lsr[0] & 1, 0, "data ready");
            let mut b = [0u8];
            port.pio_read(BASE, 0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, input);
        let mut lsr = [0u8];
        port.pio_read(BASE, 5, &mut lsr);
        assert_eq!(lsr[0] & 1, 0, "drained");
    }

    #[test]
    fn state_round_trips_with_unread_input() {
        let buf = SharedBuf::default();
        let mut src = SerialPort::new(EventFdTrigger::new().unwrap(), Box::new(std::io::sink()));
        src.pio_write(BASE, 3, &[0x03]); // 8N1
        src.pio_write(BASE, 7, &[0x5a]); // scratch
        src.enqueue_input(&[b'x'; 70]); // 64 in the FIFO, 6 waiting
        let json = serde_json::to_string(&src.save_state()).unwrap();
        let state: SerialPortState = serde_json::from_str(&json).unwrap();
        let mut dst = SerialPort::new(EventFdTrigger::new().unwrap(), Box::new(buf.clone()));
        dst.restore_state(&state).unwrap();
        assert_eq!(dst.save_state(), state);
        let mut b = [0u8];
        dst.pio_read(BASE, 7, &mut b);
        assert_eq!(b[0], 0x5a);
        let mut n = 0;
        loop {
            let mut lsr = [0u8];
            dst.pio_read(BASE, 5, &mut lsr);
            if lsr[0] & 1 == 0 {
                break;
            }
            dst.pio_read(BASE, 0, &mut b);
            n += 1;
        }
        assert_eq!(n, 70, "no console input lost across the move");
        dst.pio_write(BASE, 0, b"!");
        assert_eq!(&*buf.0.lock().unwrap(), b"!", "output goes to the destination's console");
    }

    #[test]
    fn odd_access_sizes_are_ignored() {
        let mut port = SerialPort::new(EventFdTrigger::new().unwrap(), Box::new(std::io::sink()));
        let mut wide = [0xaau8; 2];
        port.pio_read(BASE, 0, &mut wide);
        assert_eq!(wide, [0xaa, 0xaa]);
        port.pio_write(BASE, 300, &[1]);
    }
}
