# Placement constraint for the decode-core kernel on the Alveo U55C: keep the DMA engine in SLR0.
#
# Why this file exists: the U55C's HBM stacks, their memory controllers and the platform's HBM
# switch sit at the bottom of SLR0, so all 32 m_axi_hbm<ch> ports end there. The core's DMA engine
# (`dma` in rtl/core.py: one AXI4 manager and one read FIFO per pseudo-channel) moves 32 x 512 bits
# per cycle through those ports. If the placer puts it in SLR1 or SLR2, every AXI channel crosses
# one or two SLR boundaries at the kernel clock. Pinning the DMA to SLR0 keeps the AXI paths short
# and leaves the placer free to spread the matrix unit (too large for one SLR next to the
# platform's static region) over the other SLRs, fed from the DMA's FIFO outputs. A whole-kernel
# `slr=` assignment in link.cfg would not fit for the same reason, hence a cell-level pblock.
#
# How it is used: v++ runs build/<geometry>/impl_pre.tcl before opt_design (impl.cfg:
# run.impl_1.STEPS.OPT_DESIGN.TCL.PRE, `-t hw` only); that file sets `tandem_cu` (the compute
# unit's instance name, tandem_decode_core_1) and sources this one.
#
# It only adds cells to the platform's existing SLR0 pblock of the dynamic region. If the
# platform has no such pblock, or no cell matches, it prints a warning and constrains nothing:
# the build still completes, only without this placement help.

if {![info exists tandem_cu]} { set tandem_cu tandem_decode_core_1 }
# Instances (leaf names under the compute unit) that talk to HBM.
if {![info exists tandem_hbm_cells]} { set tandem_hbm_cells {dma} }

set tandem_pblock [get_pblocks -quiet pblock_dynamic_SLR0]
if {[llength $tandem_pblock] == 0} {
    puts "WARNING: \[tandem\] no pblock_dynamic_SLR0 in this platform; the DMA is not pinned to SLR0"
    return
}
foreach leaf $tandem_hbm_cells {
    set found [get_cells -quiet -hierarchical -regexp -filter "NAME =~ .*/${tandem_cu}/(.*/)?${leaf}"]
    if {[llength $found] == 0} {
        puts "WARNING: \[tandem\] no cell $leaf under $tandem_cu; it is not pinned to SLR0"
        continue
    }
    # The shallowest match is the instance itself; deeper ones are its namesakes inside it.
    set cell [lindex [lsort -command {apply {{a b} {
        expr {[llength [split $a /]] - [llength [split $b /]]}
    }}} $found] 0]
    add_cells_to_pblock $tandem_pblock [get_cells $cell]
    puts "INFO: \[tandem\] $cell placed in pblock_dynamic_SLR0 (next to the HBM controllers)"
}
