//! Tests: register numbering, a guest-side harness (GDT/IDT/TSS/page tables) shared by the differential test
//! and the micro-guests.

mod diff;
mod guest;
mod micro;

use iced_x86::Register;

use crate::exec::gpr_info;

#[test]
fn iced_register_numbering_matches_gpr_info() {
    assert_eq!(gpr_info(Register::AL), Some((0, 1, false)));
    assert_eq!(gpr_info(Register::BL), Some((3, 1, false)));
    assert_eq!(gpr_info(Register::AH), Some((0, 1, true)));
    assert_eq!(gpr_info(Register::BH), Some((3, 1, true)));
    assert_eq!(gpr_info(Register::SPL), Some((4, 1, false)));
    assert_eq!(gpr_info(Register::DIL), Some((7, 1, false)));
    assert_eq!(gpr_info(Register::R8L), Some((8, 1, false)));
    assert_eq!(gpr_info(Register::R15L), Some((15, 1, false)));
    assert_eq!(gpr_info(Register::AX), Some((0, 2, false)));
    assert_eq!(gpr_info(Register::R15W), Some((15, 2, false)));
    assert_eq!(gpr_info(Register::EAX), Some((0, 4, false)));
    assert_eq!(gpr_info(Register::R15D), Some((15, 4, false)));
    assert_eq!(gpr_info(Register::RAX), Some((0, 8, false)));
    assert_eq!(gpr_info(Register::RSP), Some((4, 8, false)));
    assert_eq!(gpr_info(Register::R15), Some((15, 8, false)));
    assert_eq!(gpr_info(Register::EIP), None);
    assert_eq!(Register::CS as usize, Register::ES as usize + 1);
    assert_eq!(Register::GS as usize, Register::ES as usize + 5);
}
